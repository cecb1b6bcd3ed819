"""evaluate reports the token-weighted validation loss, its bits per byte, and leaves the model as it was."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from crowdtrain.model import GPT, GPTConfig, evaluate


@pytest.fixture
def sequences() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(0, 256, (10, 33))


def test_bits_per_byte_is_loss_in_bits(model: GPT, sequences: torch.Tensor) -> None:
    result = evaluate(model, sequences, batch_size=4)
    assert result.num_tokens == 10 * 32
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))
    scaled = evaluate(model, sequences, batch_size=4, bytes_per_token=4.0)
    assert scaled.bits_per_byte == pytest.approx(result.bits_per_byte / 4)


def test_short_last_batch_is_weighted_by_tokens(model: GPT, sequences: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        _, full = model(sequences[:, :-1], sequences[:, 1:])
    result = evaluate(model, sequences, batch_size=3)
    assert result.loss == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_restores_train_mode(model: GPT, sequences: torch.Tensor, training: bool) -> None:
    model.train(training)
    evaluate(model, sequences)
    assert model.training is training


def test_runs_without_dropout_or_gradients(
    tiny_config: Callable[..., GPTConfig], sequences: torch.Tensor
) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.5)).train()
    first = evaluate(model, sequences)
    second = evaluate(model, sequences)
    assert first == second
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((0, 33), {}, "sequences"),
        ((4, 1), {}, "sequences"),
        ((4, 33), {"batch_size": 0}, "batch_size"),
        ((4, 33), {"bytes_per_token": 0.0}, "bytes_per_token"),
    ],
)
def test_bad_arguments_are_refused(
    model: GPT, shape: tuple[int, int], kwargs: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate(model, torch.zeros(shape, dtype=torch.long), **kwargs)  # type: ignore[arg-type]
