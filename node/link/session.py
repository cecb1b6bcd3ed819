"""This node's session with its coordinator, as the threads that talk to it share it.

:class:`CoordinatorSession` holds the session token every call carries and
registers again when the coordinator says the session expired; it runs each
background round so that a lost coordinator is logged once (and its return
once) and a refusal ends the session: it records the error and sets the
node's stop event. Knows nothing about shards, heartbeats or training.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from crowdtrain.node.link.errors import CoordinatorError
from crowdtrain.node.link.grpc import CoordinatorClient
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CoordinatorSession:
    """The session a registration opened: ``client`` and the token its calls carry.

    ``register()`` registers again and returns the new token (the session
    expired). ``stop`` is set when the session ends for good (:attr:`fatal`
    says why): a refusal, a damaged shard, anything a retry cannot mend.
    Thread-safe.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        token: str,
        register: Callable[[], str],
        stop: threading.Event,
    ):
        self.client = client
        self.token = token
        self._register = register
        self._stop = stop
        self._token_lock = threading.Lock()
        self.connected = True
        self.fatal: CrowdtrainError | None = None

    def call(self, call: Callable[[str], T]) -> T:
        """``call(token)``, registering again once if the session expired."""
        token = self.token
        try:
            return call(token)
        except CoordinatorError as e:
            if not e.unauthenticated:
                raise
            with self._token_lock:
                if self.token == token:
                    logger.info("session expired; registering again")
                    self.token = self._register()
            return call(self.token)

    def run_round(self, what: Callable[[], object]) -> bool:
        """Run one background round; False when the session must end (a fatal error).

        A coordinator that does not answer is logged once, as is its return;
        the round is tried again at the next interval.
        """
        try:
            what()
            if not self.connected:
                logger.info("coordinator reachable again")
            self.connected = True
        except CoordinatorError as e:
            if e.denied:  # banned, or no longer admitted: nothing to retry
                self.fail(CoordinatorError(f"the coordinator refused this node: {e}"))
                return False
            if self.connected:
                logger.warning("lost the coordinator (%s); training goes on", e)
            self.connected = False
        except CrowdtrainError as e:
            self.fail(e)
            return False
        except Exception:  # the link must never take training down
            logger.exception("coordinator link failed; retrying")
        return True

    def fail(self, error: CrowdtrainError) -> None:
        """End the session: training stops and raises ``error``."""
        self.fatal = error
        self._stop.set()

    def leave(self) -> None:
        """Tell the coordinator this node left (its leases return to the pool)."""
        try:
            self.client.leave(self.token)
        except CoordinatorError as e:
            logger.warning("could not tell the coordinator we left: %s", e)


__all__ = ["CoordinatorSession"]
