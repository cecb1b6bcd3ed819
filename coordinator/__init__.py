"""crowdtrain.coordinator: the coordinator service, its command line, and a client for its API.

``crowdtrain.coordinator.Client`` is imported on first use, so importing this
package stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crowdtrain.coordinator.client import Client, ClientError, Records

__all__ = ["Client", "ClientError", "Records"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crowdtrain.coordinator import client

        return getattr(client, name)
    raise AttributeError(f"module 'crowdtrain.coordinator' has no attribute {name!r}")
