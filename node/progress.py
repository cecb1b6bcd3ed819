"""How a node shows its progress: a terminal bar, periodic log lines, or nothing.

``auto`` draws a bar when stderr is a terminal and logs a line every few
seconds otherwise (a log file or a supervisor).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("crowdtrain.node")

_LOG_EVERY_S = 10.0
_POSTFIX_EVERY_S = 1.0
MODES = ("auto", "bar", "log", "none")


class Progress:
    def __init__(self, mode: str, name: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar: tqdm | None = None
        if mode == "bar":
            self._bar = tqdm(
                desc=name,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )
        self._last_postfix = 0.0
        self._last_log = time.monotonic()

    def update(self, stats: Any, num_tokens: int) -> None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(num_tokens)
            if now - self._last_postfix >= _POSTFIX_EVERY_S:
                self._last_postfix = now
                self._bar.set_postfix_str(_summary(stats), refresh=False)
        elif self.mode == "log" and now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.info("%s", _summary(stats))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _summary(stats: Any) -> str:
    loss = f"{stats.loss:.3f}" if stats.loss is not None else "-"
    val = f"{stats.val_loss:.3f}" if stats.val_loss is not None else "-"
    return (
        f"step {stats.step} | {stats.tokens_per_s:,.0f} tok/s | loss {loss} | val {val} | "
        f"peers {stats.num_peers} | {stats.num_tokens:,} tok"
    )
