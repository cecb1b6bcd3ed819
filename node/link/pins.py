"""Coordinator keys a node trusted on first contact, like ssh's ``known_hosts``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.files import atomic_write

logger = logging.getLogger(__name__)

KNOWN_COORDINATORS_FILE = "known_coordinators.json"


class KeyPins:
    """Coordinator keys this node trusted on first contact (like ssh's known_hosts).

    A coordinator whose key differs from the pinned one is refused: it may be
    an impostor. The file maps each coordinator URL to its key in hex.
    """

    def __init__(self, home: Path):
        self.path = Path(home) / KNOWN_COORDINATORS_FILE

    def _load(self) -> dict[str, str]:
        try:
            pins = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CrowdtrainError(
                f"{self.path} is damaged ({e}); fix or delete it (its keys are then "
                "trusted again on first contact)"
            ) from None
        if not isinstance(pins, dict):
            raise CrowdtrainError(f"{self.path} is damaged; fix or delete it")
        return {str(k): str(v) for k, v in pins.items()}

    def check(self, url: str, public_key: bytes) -> None:
        """Pin ``public_key`` for ``url`` on first contact; refuse a changed key."""
        if len(public_key) != 32:
            raise CrowdtrainError(f"the coordinator at {url} presented no valid key")
        pins = self._load()
        key = public_key.hex()
        pinned = pins.get(url)
        if pinned is None:
            pins[url] = key
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(pins, indent=2, sort_keys=True))
            logger.info("trusting coordinator %s with key %s (first contact)", url, key[:16])
            return
        if pinned != key:
            raise CrowdtrainError(
                f"WARNING: the coordinator at {url} presents key {key[:16]}..., not the "
                f"{pinned[:16]}... this node pinned on first contact. Someone may be "
                "impersonating it. If its operator really replaced the key, remove the "
                f"line for {url} from {self.path} and join again."
            )
