"""Peak compute of the devices nodes train on, to tell a possible claim from an impossible one.

A node reports its device as a string: ``cuda:<GPU name>`` (torch's device
name), ``mps``, or ``cpu`` / ``cpu:<threads>``. :func:`peak_flops` gives the
most dense FLOP/s such a device can do; a receipt claiming more compute per
second than that is impossible. Figures are vendors' dense (no sparsity)
peaks; the bf16 column is the fastest half-precision tensor-core rate, so the
bound holds whatever precision a node trains in. Knows nothing about
networking or storage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak FLOP/s of one kind of device (per thread for CPUs)."""

    name: str
    bf16_flops: float
    fp32_flops: float

    @property
    def max_flops(self) -> float:
        return max(self.bf16_flops, self.fp32_flops)


T = 1e12
# GPUs by a substring of torch.cuda.get_device_name(), most specific first: the first
# entry whose key occurs in the name wins ("A100" before "A10", "L40S" before "L40").
GPU_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("GB200", 2500 * T, 80 * T),
    DevicePeak("B200", 2250 * T, 80 * T),
    DevicePeak("B100", 1750 * T, 60 * T),
    DevicePeak("H200", 989 * T, 67 * T),
    DevicePeak("H100", 989 * T, 67 * T),
    DevicePeak("H800", 989 * T, 67 * T),
    DevicePeak("GH200", 989 * T, 67 * T),
    DevicePeak("H20", 148 * T, 44 * T),
    DevicePeak("A100", 312 * T, 19.5 * T),
    DevicePeak("A800", 312 * T, 19.5 * T),
    DevicePeak("A10G", 70 * T, 35 * T),
    DevicePeak("A10", 125 * T, 31.2 * T),
    DevicePeak("A30", 165 * T, 10.3 * T),
    DevicePeak("A40", 150 * T, 37.4 * T),
    DevicePeak("L40S", 362 * T, 91.6 * T),
    DevicePeak("L40", 181 * T, 90.5 * T),
    DevicePeak("L4", 121 * T, 30.3 * T),
    DevicePeak("V100", 125 * T, 15.7 * T),
    DevicePeak("T4", 65 * T, 8.1 * T),
    DevicePeak("RTX 6000 Ada", 364 * T, 91.1 * T),
    DevicePeak("RTX A6000", 155 * T, 38.7 * T),
    DevicePeak("RTX 5090", 419 * T, 104.8 * T),
    DevicePeak("RTX 5080", 225 * T, 56.3 * T),
    DevicePeak("RTX 4090", 330 * T, 82.6 * T),
    DevicePeak("RTX 4080", 195 * T, 48.7 * T),
    DevicePeak("RTX 4070", 117 * T, 29.2 * T),
    DevicePeak("RTX 3090", 142 * T, 35.6 * T),
    DevicePeak("RTX 3080", 119 * T, 29.8 * T),
    DevicePeak("RTX 3070", 81 * T, 20.3 * T),
    DevicePeak("RTX 3060", 51 * T, 12.7 * T),
    DevicePeak("MI355X", 2500 * T, 157 * T),
    DevicePeak("MI325X", 1307 * T, 163 * T),
    DevicePeak("MI300X", 1307 * T, 163 * T),
    DevicePeak("MI250X", 383 * T, 95.7 * T),
    DevicePeak("MI250", 362 * T, 90.5 * T),
    DevicePeak("MI210", 181 * T, 45.3 * T),
)
# An unknown GPU may be the fastest there is.
UNKNOWN_GPU = DevicePeak("unknown GPU", max(p.bf16_flops for p in GPU_PEAKS), 163 * T)
# The largest Apple GPU (M-series Ultra) with margin; torch reports only "mps".
APPLE_MPS = DevicePeak("Apple GPU (mps)", 60 * T, 60 * T)
# One CPU thread: AVX-512 with two FMA units at 4 GHz is 256 GFLOP/s of fp32;
# AMX tiles reach about 2 TFLOP/s of bf16 per core.
CPU_THREAD = DevicePeak("CPU thread", 2 * T, 0.256 * T)
# A CPU whose thread count was not reported: as many threads as a large server has.
CPU_MAX_THREADS = 256


def parse_cpu_threads(device: str) -> int | None:
    """Threads in ``cpu:<threads>``; None for plain ``cpu`` or anything malformed."""
    _, _, rest = device.partition(":")
    if rest.isdigit() and 0 < int(rest) <= 4096:
        return int(rest)
    return None


def device_peak(device: str) -> DevicePeak:
    """The peak of the device a node reported (see the module docstring for the forms).

    Unknown or malformed names get the bound of the fastest device known,
    so a device is never judged slower than it may be.
    """
    kind = device.split(":", 1)[0].strip().lower()
    if kind == "cpu":
        threads = parse_cpu_threads(device) or CPU_MAX_THREADS
        return DevicePeak(
            f"CPU, {threads} threads",
            CPU_THREAD.bf16_flops * threads,
            CPU_THREAD.fp32_flops * threads,
        )
    if kind == "mps":
        return APPLE_MPS
    if kind == "cuda":
        name = device.split(":", 1)[1] if ":" in device else ""
        for peak in GPU_PEAKS:
            if peak.name.lower() in name.lower():
                return peak
    return UNKNOWN_GPU


def peak_flops(device: str) -> float:
    """The most FLOP/s the device could do in any precision (see :func:`device_peak`)."""
    return device_peak(device).max_flops
