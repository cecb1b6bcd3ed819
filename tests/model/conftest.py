"""Tiny model configs shared by the model tests; everything here runs on CPU in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from crowdtrain.model import GPT, GPTConfig


def _tiny_config(**overrides: object) -> GPTConfig:
    fields: dict[str, object] = dict(
        vocab_size=256, seq_len=32, num_layers=2, num_heads=2, d_model=32
    )
    fields.update(overrides)
    return GPTConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def tiny_config() -> Callable[..., GPTConfig]:
    """Builds a 2-layer, 32-wide byte-level config; override any field by keyword."""
    return _tiny_config


@pytest.fixture(params=["rotary", "learned"])
def positions(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def config(positions: str) -> GPTConfig:
    return _tiny_config(positions=positions)


@pytest.fixture
def model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(config)
