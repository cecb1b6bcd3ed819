"""How a node shows its progress: a terminal bar, a notebook bar, log lines, or nothing.

One status line says what a volunteer wants to see at a glance: tokens/s,
loss, step, peers, the shard being trained and the credit the coordinator
has verified. ``auto`` draws a bar when stderr is a terminal and logs a line
every few seconds otherwise (a log file or a supervisor); ``notebook`` draws
``tqdm.auto``'s bar (a widget in Jupyter with ipywidgets, the text bar
elsewhere).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

from tqdm import tqdm

from crowdtrain.node.stats.accounting import NodeStats

logger = logging.getLogger("crowdtrain.node")

_LOG_EVERY_S = 10.0
_POSTFIX_EVERY_S = 1.0
MODES = ("auto", "bar", "notebook", "log", "none")


def _notebook_bar(**kwargs: Any) -> tqdm:
    with warnings.catch_warnings():
        # tqdm.auto warns that notebook mode is "experimental"; it is what notebooks want.
        warnings.filterwarnings("ignore", message=".*notebook mode.*")
        from tqdm.auto import tqdm as auto_tqdm
    return auto_tqdm(**kwargs)


class Progress:
    """Shows a node's counters while it trains; :meth:`close` when training stops."""

    def __init__(self, mode: str, name: str, total: int | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar: tqdm | None = None
        options: dict[str, Any] = dict(
            desc=name, total=total, unit="tok", unit_scale=True, mininterval=0.5
        )
        if mode == "bar":
            self._bar = tqdm(dynamic_ncols=True, file=sys.stderr, **options)
        elif mode == "notebook":
            self._bar = _notebook_bar(**options)
        self._last_postfix = 0.0
        self._last_log = time.monotonic()

    def update(self, stats: NodeStats, num_tokens: int) -> None:
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(num_tokens)
            if now - self._last_postfix >= _POSTFIX_EVERY_S:
                self._last_postfix = now
                self._bar.set_postfix_str(status_line(stats), refresh=False)
        elif self.mode == "log" and now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.info("%s | %s tok", status_line(stats), f"{stats.num_tokens:,}")

    def close(self, stats: NodeStats | None = None) -> None:
        if self._bar is not None:
            if stats is not None:
                self._bar.set_postfix_str(status_line(stats), refresh=False)
            self._bar.close()


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def status_line(stats: NodeStats) -> str:
    """``step 12 | 3.4k tok/s | computing 83% | loss 2.31 | val 2.40 | peers 3 | shard s00017 |
    verified 1.2M tok | up 1.2 MB (averaging 1.0, state 0.2, control 0.0, data 0.0)``.

    ``computing`` is the share of the training loop's time spent computing (the rest
    waited on the swarm, for data, or evaluated); the shard shows once training has one;
    ``up`` is what this node has sent, by purpose.
    """
    loss = f"{stats.loss:.3f}" if stats.loss is not None else "-"
    val = f"{stats.val_loss:.3f}" if stats.val_loss is not None else "-"
    parts = [
        f"step {stats.step}",
        f"{_count(stats.tokens_per_s)} tok/s",
    ]
    utilisation = stats.time.utilisation
    if utilisation is not None:
        parts.append(f"computing {utilisation:.0%}")
    parts += [
        f"loss {loss}",
        f"val {val}",
        f"peers {stats.num_peers}",
    ]
    if stats.shard:
        parts.append(f"shard {stats.shard}")
    parts.append(f"verified {_count(stats.verified_tokens)} tok")
    parts.append(stats.traffic.summary())
    return " | ".join(parts)
