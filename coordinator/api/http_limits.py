"""Limits on HTTP connections that uvicorn does not set by itself.

uvicorn times a connection out only while it idles after a response: a client
that opens connections and sends half a request head each holds them for ever
(slowloris), however many it opens. :class:`HeadTimeoutH11` closes a connection
whose request head has not fully arrived within :data:`HEAD_TIMEOUT_S`, first
request or next one on a kept-alive connection alike; :func:`uvicorn_limits`
adds a cap on concurrent connections and on the size of a head.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

# Time a client has to send a whole request head (line and headers).
HEAD_TIMEOUT_S = 10.0
# Concurrent connections (and requests) before uvicorn answers 503.
MAX_CONNECTIONS = 2000
# The largest request head accepted (h11 refuses a larger one with 431).
MAX_HEAD_BYTES = 16 * 1024


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # the next request on this connection: a new head

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_late)

    def _head_late(self) -> None:
        self._head_deadline = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_limits() -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.Config`` that bound what clients can hold."""
    return {
        "http": HeadTimeoutH11,
        "limit_concurrency": MAX_CONNECTIONS,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
