"""How many sequences a node trains per forward pass: the largest micro-batch that fits
its device's memory (:func:`choose_micro_batch`), probed on CUDA, the run's own
size on a CPU. Knows nothing about the swarm, the coordinator or the training loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crowdtrain.node.device.precision import autocast, forward_backward, random_batch
from crowdtrain.protocol.errors import CrowdtrainError

logger = logging.getLogger(__name__)


# AdamW keeps two fp32 statistics per parameter (exp_avg, exp_avg_sq).
_ADAMW_STATES = 2


@dataclass(frozen=True)
class MicroBatchChoice:
    """The micro-batch a node trains with, and why.

    ``bytes_per_sequence`` is the measured memory each extra sequence costs
    and ``budget_bytes`` the memory the choice had to fit in (both None when
    nothing was measured: the run spec's default on a CPU without a cap).
    """

    size: int
    reason: str
    bytes_per_sequence: int | None = None
    budget_bytes: int | None = None


def choose_micro_batch(
    model: nn.Module,
    device: torch.device | str,
    *,
    seq_len: int,
    vocab_size: int,
    upper: int,
    default: int,
    memory_cap_bytes: int | None = None,
    headroom: float = 0.15,
) -> MicroBatchChoice:
    """The largest micro-batch (sequences of ``seq_len`` tokens) that trains on ``device``.

    ``model`` must already be on ``device``; it is left as it was (gradients
    cleared). Never more than ``upper`` (the per-step batch: a larger
    micro-batch would only be cut). ``headroom`` is the share of memory left
    free for the allocator's fragmentation, the averager's buffers and other
    programs.

    - CUDA: runs real forward+backward passes (bf16 autocast where supported)
      at 1 and 2 sequences, after an unmeasured one, to measure the peak
      memory per sequence; reserves AdamW's two fp32 statistics per
      parameter, extrapolates into the free memory (``torch.cuda.mem_get_info``)
      and confirms the candidate with two real micro-batches in a row,
      halving it while it runs out of memory. Call
      :func:`prefer_expandable_segments` before CUDA starts: without it the
      allocator's fragmentation can exceed the headroom in a long run.
    - CPU and MPS: the run spec's ``default``, unless a memory cap is given
      (``memory_cap_bytes``: the ``CROWDTRAIN_MEMORY_CAP_BYTES`` test hook): then the bytes autograd saves per sequence are measured (the same on
      any device) and the largest size that fits the cap is chosen.

    A cap applies on CUDA too (the smaller of the cap and the free memory).
    Raises :class:`CrowdtrainError` when not even one sequence fits.
    """
    if upper < 1 or default < 1:
        raise CrowdtrainError(
            f"micro-batch bounds must be at least 1 (upper={upper}, default={default})"
        )
    if not 0.0 <= headroom < 1.0:
        raise CrowdtrainError(f"headroom must be in [0, 1), got {headroom}")
    device = torch.device(device)
    cap = memory_cap_bytes
    if device.type == "cuda":
        return _probe_cuda(model, device, seq_len, vocab_size, upper, cap, headroom)
    if cap is None:
        size = min(default, upper)
        return MicroBatchChoice(size, f"the run spec's micro_batch_size on {device.type}")
    return _fit_cap(model, device, seq_len, vocab_size, upper, cap, headroom)


def micro_batch_size(
    chosen: str,
    optimizer: Any,
    model: nn.Module,
    device: torch.device,
    model_spec: Any,
    memory_cap_bytes: int | None = None,
) -> int:
    """A node's sequences per forward pass: ``--micro-batch``'s number, or with ``auto``
    what :func:`choose_micro_batch` finds (within ``memory_cap_bytes`` when given), never
    above one step's batch (``optimizer`` and ``model_spec`` are the run spec's
    [optimizer] and [model] sections)."""
    upper = (
        optimizer.inner_batch_size if optimizer.mode == "diloco" else optimizer.target_batch_size
    )
    if chosen != "auto":
        try:
            size = int(chosen)
        except ValueError:
            size = 0
        if size < 1:
            raise CrowdtrainError(
                f"--micro-batch must be 'auto' or a whole number of sequences, got {chosen!r}"
            )
        return min(size, upper)
    choice = choose_micro_batch(
        model,
        device,
        seq_len=model_spec.seq_len,
        vocab_size=model_spec.vocab_size,
        upper=upper,
        default=min(optimizer.micro_batch_size, upper),
        memory_cap_bytes=memory_cap_bytes,
    )
    logger.info("micro-batch of %d sequences (%s)", choice.size, choice.reason)
    return choice.size


def format_bytes(num_bytes: float) -> str:
    """``num_bytes`` in the largest binary unit that keeps it at least 1 (``1.50 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{int(num_bytes)} B"


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _clear(model: nn.Module, device: torch.device) -> None:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _too_small(needed: int, budget: int, where: str) -> CrowdtrainError:
    return CrowdtrainError(
        f"this run's model needs about {format_bytes(needed)} to train even one sequence, "
        f"but {where} leaves {format_bytes(budget)} for it; close programs that use the "
        "device's memory, or join from a device with more memory"
    )


def _saved_activation_bytes(
    model: nn.Module, batch: int, seq_len: int, vocab_size: int, device: torch.device
) -> tuple[int, int, int]:
    """Bytes autograd saves for backward at ``batch`` sequences, its largest saved
    tensor, and the bytes of the output the caller holds (the logits).

    Parameters saved by their matmuls are not activations and are left out;
    a storage saved by several operations is counted once.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total, largest
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
            largest = max(largest, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs, targets = random_batch(batch, seq_len, vocab_size, device)
        with autocast(device):
            output, loss = model(inputs, targets)
    output_bytes = output.untyped_storage().nbytes()
    del output
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total, largest, output_bytes


def estimate_sequence_bytes(
    model: nn.Module, device: torch.device | str, *, seq_len: int, vocab_size: int
) -> tuple[int, int]:
    """Memory to train ``model``: bytes per sequence, and fixed bytes, from autograd alone.

    Measured from the tensors autograd saves for backward at 1 and 2
    sequences (so the same on any device), plus the logits the caller holds
    and twice the largest saved tensor: backward holds the gradient arriving
    at the largest activation and the one it produces beside the saved ones
    (for a GPT, the fp32 log-softmax over the vocabulary). The fixed part is
    the parameters, their gradients, AdamW's two statistics and the saved
    tensors that do not grow with the batch. For GPT-2 small on an H100 it
    gave 1.123 GB per sequence, as the measured peaks at 1 to 8 sequences
    did (``torch.cuda.max_memory_allocated``). Runs two real forward+backward
    passes on ``device``; gradients are cleared after.
    """
    device = torch.device(device)
    saved_1, largest_1, output_1 = _saved_activation_bytes(model, 1, seq_len, vocab_size, device)
    saved_2, largest_2, output_2 = _saved_activation_bytes(model, 2, seq_len, vocab_size, device)
    per_sequence = (
        max(1, saved_2 - saved_1) + 2 * max(0, largest_2 - largest_1) + max(0, output_2 - output_1)
    )
    fixed = (2 + _ADAMW_STATES) * _param_bytes(model) + max(0, saved_1 - (saved_2 - saved_1))
    return per_sequence, fixed


def _fit_cap(
    model: nn.Module,
    device: torch.device,
    seq_len: int,
    vocab_size: int,
    upper: int,
    cap: int,
    headroom: float,
) -> MicroBatchChoice:
    per_sequence, fixed = estimate_sequence_bytes(
        model, device, seq_len=seq_len, vocab_size=vocab_size
    )
    budget = int(cap * (1.0 - headroom))
    fits = (budget - fixed) // per_sequence
    if fits < 1:
        raise _too_small(fixed + per_sequence, budget, f"the memory cap of {format_bytes(cap)}")
    size = int(min(fits, upper))
    bound = "the per-step batch" if size == upper else "memory"
    return MicroBatchChoice(
        size,
        f"{size} sequences fit {format_bytes(budget)} ({format_bytes(cap)} cap less "
        f"{headroom:.0%} headroom) at {format_bytes(per_sequence)} per sequence; "
        f"bounded by {bound}",
        per_sequence,
        budget,
    )


def _peak_bytes(
    model: nn.Module, batch: int, seq_len: int, vocab_size: int, device: torch.device
) -> int:
    """Peak memory a forward+backward at ``batch`` sequences allocates, over what was there."""
    _clear(model, device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    forward_backward(model, batch, seq_len, vocab_size, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _clear(model, device)
    return peak


def _probe_cuda(
    model: nn.Module,
    device: torch.device,
    seq_len: int,
    vocab_size: int,
    upper: int,
    cap: int | None,
    headroom: float,
) -> MicroBatchChoice:
    optimizer_bytes = _ADAMW_STATES * _param_bytes(model)
    try:
        # Unmeasured first pass: cuBLAS workspaces and other one-off buffers would
        # otherwise count in the 1-sequence peak and shrink the per-sequence slope.
        forward_backward(model, 1, seq_len, vocab_size, device)
        peak_1 = _peak_bytes(model, 1, seq_len, vocab_size, device)
        peak_2 = _peak_bytes(model, 2, seq_len, vocab_size, device) if upper > 1 else peak_1
    except torch.cuda.OutOfMemoryError:
        _clear(model, device)
        free, _ = torch.cuda.mem_get_info(device)
        raise _too_small(optimizer_bytes, free, "the GPU's free memory") from None
    per_sequence = max(1, peak_2 - peak_1)
    fixed = max(0, peak_1 - per_sequence) + optimizer_bytes
    free, total = torch.cuda.mem_get_info(device)
    available = min(free, cap) if cap is not None else free
    budget = int(available * (1.0 - headroom))
    size = int(min(upper, (budget - fixed) // per_sequence))
    if size < 1:
        where = "the GPU's free memory" if cap is None else f"a cap of {format_bytes(available)}"
        raise _too_small(fixed + per_sequence, budget, f"{where} less headroom")
    # Confirm for real, with AdamW's statistics held as they will be in training, and
    # two micro-batches in a row as gradient accumulation runs them (the second
    # meets the first's gradients and the allocator's cached blocks).
    reserve = torch.empty(optimizer_bytes, dtype=torch.uint8, device=device)
    try:
        while True:
            try:
                for _ in range(2):
                    forward_backward(model, size, seq_len, vocab_size, device)
                torch.cuda.synchronize(device)
                break
            except torch.cuda.OutOfMemoryError:
                _clear(model, device)
                if size == 1:
                    raise _too_small(fixed + per_sequence, budget, "the GPU") from None
                logger.info("a trial at %d sequences ran out of memory; halving", size)
                size = max(1, size // 2)
    finally:
        del reserve
        _clear(model, device)
    bound = "the per-step batch" if size == upper else "memory"
    return MicroBatchChoice(
        size,
        f"{size} sequences fit {format_bytes(budget)} ({format_bytes(available)} free of "
        f"{format_bytes(total)} less {headroom:.0%} headroom) at "
        f"{format_bytes(per_sequence)} per sequence, confirmed by two trial micro-batches; "
        f"bounded by {bound}",
        per_sequence,
        budget,
    )


__all__ = [
    "MicroBatchChoice",
    "choose_micro_batch",
    "estimate_sequence_bytes",
    "format_bytes",
    "micro_batch_size",
]
