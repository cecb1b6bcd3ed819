"""The one error a node's link to its coordinator raises: :class:`CoordinatorError`."""

from __future__ import annotations

import grpc

from crowdtrain.protocol.errors import CrowdtrainError


class CoordinatorError(CrowdtrainError):
    """The coordinator could not be reached or refused a request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code

    @property
    def unauthenticated(self) -> bool:
        return self.code == grpc.StatusCode.UNAUTHENTICATED

    @property
    def denied(self) -> bool:
        return self.code == grpc.StatusCode.PERMISSION_DENIED

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
