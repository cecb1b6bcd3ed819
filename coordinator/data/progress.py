"""What ``prepare-data`` shows while it reads a corpus: a bar on a terminal, log lines
otherwise.

Owns the display only: the bytes read of a pass, and while tokenizing the
shards written and tokens per second. Knows nothing about what is read or written.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Off a terminal, progress is a log line at most this often.
_LOG_EVERY_S = 10.0


class PassProgress:
    """Bytes read of a pass over the corpus: a bar on a terminal (with the shards written
    and tokens/s when tokenizing), else a log line every ``_LOG_EVERY_S`` at most."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total = desc, total
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=None, dynamic_ncols=True
        )
        self._started = self._last_log = time.monotonic()
        self._done = 0

    def update(self, num_bytes: int, num_tokens: int | None = None, num_shards: int = 0) -> None:
        self._done += num_bytes
        now = time.monotonic()
        rate = num_tokens / max(now - self._started, 1e-9) if num_tokens is not None else None
        if not self.bar.disable:
            if rate is not None:
                self.bar.set_postfix_str(f"{num_shards} shards, {rate:,.0f} tokens/s", False)
            self.bar.update(num_bytes)
        elif now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            tokens = f", {num_shards} shards, {rate:,.0f} tokens/s" if rate is not None else ""
            logger.info(
                "%s: %.1f of %.1f MB (%.0f%%)%s",
                self.desc,
                self._done / 1e6,
                self.total / 1e6,
                100 * self._done / max(self.total, 1),
                tokens,
            )

    def close(self) -> None:
        self.bar.close()
