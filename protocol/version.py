"""The version a crowdtrain process reports of itself (``--version``, its logs, its API).

Read from the installed distribution's metadata, which a source tree put on
``sys.path`` without installing does not have: then it is ``0+unknown``
rather than an error that stops the process.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

UNKNOWN_VERSION = "0+unknown"


def crowdtrain_version() -> str:
    """The installed ``crowdtrain`` distribution's version, else ``0+unknown``."""
    try:
        return version("crowdtrain")
    except PackageNotFoundError:
        return UNKNOWN_VERSION
