"""crowdtrain.node: the node daemon (``crowdtrain-node``) and the notebook API.

``from crowdtrain.node import join`` is cheap: the session module (and
hivemind behind it) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crowdtrain.node.session import Session, SessionStats, join

__all__ = ["Session", "SessionStats", "join"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crowdtrain.node import session

        return getattr(session, name)
    raise AttributeError(f"module 'crowdtrain.node' has no attribute {name!r}")
