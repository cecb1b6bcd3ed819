"""The error every user-facing mistake derives from.

Command lines catch :class:`CrowdtrainError` and print its message as one line
on stderr with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class CrowdtrainError(Exception):
    """A mistake the user can fix: the message names the input and the fix."""


class SpecError(CrowdtrainError):
    """A run spec that does not parse or does not validate."""


class ShardError(CrowdtrainError):
    """A shard or manifest that is malformed, truncated or tampered with."""


class DataError(CrowdtrainError):
    """A corpus that cannot be turned into shards."""


class IdentityError(CrowdtrainError):
    """A key or signed envelope that is missing, malformed or does not verify."""


class MalformedMessageError(IdentityError):
    """A message that is too large or not in the expected format (whoever signed it)."""


class AccessError(CrowdtrainError):
    """A peer or operator that is known but not allowed to do this."""


class AddressError(CrowdtrainError, ValueError):
    """A host or port that cannot be written as an address peers can dial."""
