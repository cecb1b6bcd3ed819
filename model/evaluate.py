"""Validation: held-out loss and bits per byte of a language model.

Owns turning fixed validation sequences into one comparable number. Knows
nothing about where the sequences come from (shards, files) or when a run
evaluates; the caller loads the data and picks the cadence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation.

    ``loss`` is the mean next-token cross-entropy in nats over ``num_tokens``
    predicted tokens; ``bits_per_byte`` is the same loss in bits per byte of
    text, comparable across tokenizers.
    """

    loss: float
    bits_per_byte: float
    num_tokens: int


def evaluate(
    model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 16,
    bytes_per_token: float = 1.0,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Mean loss of ``model`` on ``sequences``, weighted by token, and its bits per byte.

    ``model`` follows ``GPT``'s contract: ``model(idx, targets)`` returns
    ``(logits, mean_loss)``. ``sequences`` is int64 ``[N, seq_len + 1]``: each
    row's first ``seq_len`` tokens are the input and its last ``seq_len`` the
    targets. ``bytes_per_token`` is the average number of text bytes per token
    of the tokenizer (1.0 for ``ByteTokenizer``; measure it on the validation
    text for BPE). ``device`` defaults to the model's. The model runs in eval
    mode without gradients, and its previous train/eval mode is restored.
    """
    if sequences.dim() != 2 or sequences.size(0) == 0 or sequences.size(1) < 2:
        raise ValueError(
            "sequences must be a non-empty [N, seq_len + 1] tensor with seq_len >= 1, "
            f"got shape {tuple(sequences.shape)}"
        )
    if sequences.dtype.is_floating_point or sequences.dtype.is_complex:
        raise ValueError(f"sequences must hold integer token ids, got dtype {sequences.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    if device is None:
        device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    total_nats = 0.0  # Python float: float64, so thousands of batches do not lose digits.
    num_tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, sequences.size(0), batch_size):
                batch = sequences[start : start + batch_size].to(device=device, dtype=torch.long)
                inputs, targets = batch[:, :-1], batch[:, 1:]  # [b, seq_len] each
                _, loss = model(inputs, targets)
                # The model's loss is a mean over this batch; the last batch may be short.
                total_nats += loss.item() * targets.numel()
                num_tokens += targets.numel()
    finally:
        model.train(was_training)

    loss = total_nats / num_tokens
    return EvalResult(
        loss=loss,
        bits_per_byte=loss / math.log(2) / bytes_per_token,
        num_tokens=num_tokens,
    )
