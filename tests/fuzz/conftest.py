"""Fixtures of the fuzz tests: one live coordinator for both modules."""

from tests.fuzz.live import live, target

__all__ = ["live", "target"]
