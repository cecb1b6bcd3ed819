"""What a node asks the coordinator's public HTTP routes while it trains.

The swarm guard checks downloaded state against the coordinator's recorded
step and its keeper's checkpoints; these are the questions it asks. Each
answer is None when the coordinator cannot say (away, or no such checkpoint):
the guard then refuses nothing on that ground.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from crowdtrain.model import load_checkpoint
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)


@dataclass
class RunView:
    """One run's public routes on one coordinator; ``download(url, path)`` fetches files
    (the node's checked, retried download), into ``folder``."""

    url: str
    run_id: str
    folder: Path
    download: Callable[[str, Path], None]
    ca_cert: Path | None = None

    def get(self, path: str) -> Any:
        """GET one of the coordinator's public JSON routes; None when it answers 404."""
        response = httpx.get(
            f"{self.url.rstrip('/')}/api/runs/{self.run_id}{path}",
            timeout=5.0,
            verify=str(self.ca_cert) if self.ca_cert else True,
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def fresh_step(self) -> int | None:
        """The step the coordinator records now (the heartbeat's may be seconds old)."""
        try:
            return int(self.get("")["step"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            logger.info("could not ask the coordinator for its step (%s)", e)
            return None

    def checkpoint_sha256(self, step: int) -> str | None:
        """The params_sha256 of the coordinator's checkpoint of ``step``, if it keeps one."""
        try:
            found = self.get(f"/checkpoints/{step}")
        except (httpx.HTTPError, ValueError) as e:
            logger.info("could not ask the coordinator for its checkpoint of step %d (%s)", step, e)
            return None
        sha256 = found.get("sha256") if isinstance(found, dict) else None
        return sha256 if isinstance(sha256, str) and sha256 else None

    def checkpoint_state(self, step: int) -> dict[str, torch.Tensor] | None:
        """The tensors of the coordinator's checkpoint of ``step`` (safetensors: no pickle)."""
        path = self.folder / f"checkpoint-{step}.safetensors"
        try:
            self.download(
                f"{self.url.rstrip('/')}/api/runs/{self.run_id}/checkpoints/{step}/file", path
            )
            return load_checkpoint(path)[0]
        except CrowdtrainError as e:
            logger.info("could not fetch the coordinator's checkpoint of step %d (%s)", step, e)
            return None
        finally:
            path.unlink(missing_ok=True)


__all__ = ["RunView"]
