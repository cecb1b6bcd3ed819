"""The log line format every crowdtrain process writes, for people and for log collectors.

One line per event, with its time, level and logger name: plain text by
default, or one JSON object per line (``--log-json``) with the keys ``time``
(ISO 8601, UTC), ``level``, ``logger``, ``message`` and, for an exception,
``exception``. A record's ``extra={...}`` fields are added as more keys.
Knows nothing about what is logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; values that JSON cannot hold become strings."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(
    verbose: bool = False, json_lines: bool = False, stream: TextIO | None = None
) -> None:
    """Send every logger's records to ``stream`` (stderr) as text lines or JSON lines.

    Replaces handlers set before, so calling it twice does not double lines.
    Unless ``verbose``, hivemind, httpx and asyncio are quieted to what a user
    can act on.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # hivemind reads its level once, at import, from this variable.
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
        for noisy in ("hivemind", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # hivemind's averagers leave cancelled asyncio tasks behind on every
        # partial round; asyncio reports them as errors that no user can act on.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
