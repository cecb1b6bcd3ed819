"""How a node runs its model on its device: bf16 autocast where the GPU has it, opt-in
``torch.compile``, and the CUDA allocator's settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager

import torch
from torch import nn

logger = logging.getLogger(__name__)


def prefer_expandable_segments() -> None:
    """Ask PyTorch's CUDA allocator for expandable segments, unless the user chose otherwise.

    Without them, a long run fragments the allocator's cache: GPT-2 small at
    the micro-batch :func:`choose_micro_batch` picked on an H100 ran out of
    memory with 12 GiB cached but unusable. Call before anything touches CUDA
    (the allocator reads the setting once); later it only logs a warning.
    """
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        logger.warning(
            "CUDA is already in use, too late to turn on expandable segments; set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting to avoid "
            "running out of memory from fragmentation"
        )
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def autocast(device: torch.device | str) -> AbstractContextManager[object]:
    """bf16 autocast on a CUDA GPU that supports bf16; otherwise full fp32 (a no-op).

    Parameters, gradients and optimizer state stay fp32 either way; only
    matmuls and attention run in bf16, which needs no loss scaling.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(
    model: nn.Module,
    enabled: bool,
    *,
    example_batch: tuple[int, int, int] | None = None,
) -> nn.Module:
    """``model`` compiled in place with ``torch.compile`` when ``enabled``, else unchanged.

    Compiling in place (``nn.Module.compile``) keeps the state dict's keys and
    the parameters, so checkpoints and the optimizer see the same model. With
    ``example_batch`` = ``(micro_batch, seq_len, vocab_size)`` one training
    forward+backward runs now, so a compiler that cannot work here (no C
    compiler, no Triton for this GPU) fails at start: then the model stays
    eager and a warning says why. Choose the micro-batch before compiling.
    """
    if not enabled:
        return model
    try:
        model.compile()
        if example_batch is not None:
            batch, seq_len, vocab_size = example_batch
            device = next(model.parameters()).device
            forward_backward(model, batch, seq_len, vocab_size, device)
            model.zero_grad(set_to_none=True)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # any compiler failure: training works without it, only slower
        # nn.Module.compile keeps the compiled call here; clearing it restores eager.
        model._compiled_call_impl = None
        model.zero_grad(set_to_none=True)
        logger.warning(
            "torch.compile failed here (%s: %s); training without compilation, which is "
            "slower but the same. Drop --compile to silence this",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
    return model


def random_batch(
    batch: int, seq_len: int, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), device=device)
    return tokens[:, :-1], tokens[:, 1:]


def forward_backward(
    model: nn.Module, batch: int, seq_len: int, vocab_size: int, device: torch.device
) -> None:
    inputs, targets = random_batch(batch, seq_len, vocab_size, device)
    with autocast(device):
        _, loss = model(inputs, targets)
    loss.backward()
