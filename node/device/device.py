"""Which device a node trains on, how it describes it, and how long it has run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from crowdtrain.protocol.errors import CrowdtrainError


def process_age_s() -> float:
    """Seconds since this process started (from /proc; since import elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return time.time() - (int(line.split()[1]) + started)
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def pick_device(requested: str) -> torch.device:
    """The device to train on; ``auto`` prefers CUDA, then MPS, then CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise CrowdtrainError("--device cuda asked for, but torch sees no CUDA GPU here")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise CrowdtrainError("--device mps asked for, but torch sees no Apple GPU here")
    if requested not in ("cpu", "cuda", "mps"):
        raise CrowdtrainError(f"--device must be auto, cpu, cuda or mps, got {requested!r}")
    return torch.device(requested)


def describe_device(device: torch.device) -> str:
    """What the node reports: the GPU's name, or ``cpu:<threads>`` (the coordinator
    bounds the compute a receipt may claim by it)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{torch.get_num_threads()}"
    return device.type


__all__ = ["describe_device", "pick_device", "process_age_s"]
