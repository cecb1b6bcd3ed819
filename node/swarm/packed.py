"""Low-bit and sparse pseudo-gradients: the error-feedback codec and its wire format.

:class:`FeedbackCodec` runs in the trainer at each DiLoCo round's end. It adds
the residual it kept from earlier rounds to the new pseudo-gradient, keeps the
largest ``fraction`` of each tensor's values by magnitude (all of them when
``fraction`` is 1), replaces those by ``2**bits`` levels (equal-count bins of
the kept values, each level their mean), sends that, and keeps what it did not
send as the next residual: sent plus residual is exactly what it had to send.

:class:`Packed` is the wire format for such tensors (hivemind's
``BLOCKWISE_8BIT`` slot, which hivemind 1.1.12 fills only with bitsandbytes,
not offered here): the nonzero values' positions, bit-packed (none when every
value is sent), and their codes into a codebook of the part's distinct values
(lossless: a part the codec made holds at most ``2**bits`` of them per
tensor). A part with more distinct values than 256 (a reducer's average of
several senders' parts) gets 256 equal-count levels, each its values' mean:
lossy, but the exact-results all-reduce sends every peer the same bytes, so
global parameters stay bit-identical.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

MAGIC = b"CTpk"
_HEADER = struct.Struct("<4sBBBxQQ")  # magic, version, value bits, index bits, count, codebook
VERSION = 1
MAX_LEVELS = 256


class FeedbackCodec:
    """Top-``fraction`` of each tensor at ``bits`` bits per value, with error feedback."""

    def __init__(self, fraction: float, bits: int):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
        self.fraction, self.bits = fraction, bits
        self.residuals: list[torch.Tensor] | None = None

    def encode_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by what is sent of it (plus the residual); keep the rest."""
        if self.residuals is None or [r.shape for r in self.residuals] != [
            t.shape for t in tensors
        ]:
            self.residuals = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
        for tensor, residual in zip(tensors, self.residuals, strict=True):
            wanted = tensor.float() + residual
            sent = self.select(wanted)
            torch.sub(wanted, sent, out=residual)
            tensor.copy_(sent)

    def select(self, wanted: torch.Tensor) -> torch.Tensor:
        flat = wanted.flatten()
        k = max(1, math.ceil(self.fraction * flat.numel()))
        sent = torch.zeros_like(flat)
        if k >= flat.numel():
            index = torch.arange(flat.numel())
        else:
            index = flat.abs().topk(k, sorted=False).indices
        sent[index] = equal_count_levels(flat[index], 1 << self.bits)
        return sent.view_as(wanted)

    def forget(self) -> None:
        """Drop the residual (the global parameters were replaced by others')."""
        self.residuals = None


def equal_count_levels(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Each value replaced by the mean of its bin; bins hold equal shares of the sorted
    values (at most ``levels`` distinct results)."""
    if values.numel() <= levels:
        return values.clone()
    order = values.argsort()
    bins = torch.arange(values.numel()) * levels // values.numel()
    sums = torch.zeros(levels, dtype=values.dtype).scatter_add_(0, bins, values[order])
    means = sums / torch.bincount(bins, minlength=levels).to(values.dtype)
    out = torch.empty_like(values)
    out[order] = means[bins]
    return out


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned integers below 2**bits, little-endian bit order, bit-packed."""
    if codes.size == 0 or bits == 0:
        return b""
    shifts = np.arange(bits, dtype=np.uint64)
    matrix = (codes.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return bytes(np.packbits(matrix.astype(np.uint8).ravel(), bitorder="little"))


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    if count == 0 or bits == 0:
        return np.zeros(count, dtype=np.int64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
    return (matrix << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _bits_for(n: int) -> int:
    """Bits per code for ``n`` distinct codes (a power of two up to 8; 0 for one)."""
    need = max(0, math.ceil(math.log2(n))) if n > 1 else 0
    for bits in (0, 1, 2, 4, 8):
        if need <= bits:
            return bits
    raise ValueError(f"{n} codes need more than 8 bits")


class Packed(CompressionBase):
    """Sparse or dense low-bit tensors, lossless while a part has at most 256 distinct
    values (see the module docstring)."""

    compression_type = runtime_pb2.BLOCKWISE_8BIT

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        flat = tensor.detach().float().flatten()
        numel = flat.numel()
        nonzero = flat.nonzero().flatten()
        dense = nonzero.numel() * _bits_for_index(numel) >= numel  # positions would cost more
        values = flat if dense else flat[nonzero]
        codebook, codes = torch.unique(values, return_inverse=True)
        if codebook.numel() > MAX_LEVELS:
            levelled = equal_count_levels(values, MAX_LEVELS)
            codebook, codes = torch.unique(levelled, return_inverse=True)
        value_bits = _bits_for(codebook.numel())
        index_bits = 0 if dense else _bits_for_index(numel)
        positions = b"" if dense else _pack(nonzero.numpy(), index_bits)
        buffer = b"".join(
            (
                _HEADER.pack(
                    MAGIC, VERSION, value_bits, index_bits, values.numel(), codebook.numel()
                ),
                codebook.numpy().astype(np.float32).tobytes(),
                positions,
                _pack(codes.numpy(), value_bits),
            )
        )
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=buffer,
            size=tensor.shape,
            dtype="float32",
            requires_grad=False,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        magic, version, value_bits, index_bits, count, levels = _HEADER.unpack_from(buffer)
        if magic != MAGIC or version != VERSION or levels > MAX_LEVELS or value_bits > 8:
            raise ValueError("not a crowdtrain packed tensor")
        shape = tuple(serialized_tensor.size)
        numel = math.prod(shape)
        dense = index_bits == 0
        if count > numel or (dense and count != numel) or index_bits > 40:
            raise ValueError("a packed tensor's counts do not fit its shape")
        offset = _HEADER.size
        codebook = np.frombuffer(buffer, dtype=np.float32, count=levels, offset=offset)
        offset += 4 * levels
        index_bytes = (count * index_bits + 7) // 8
        positions = _unpack(buffer[offset : offset + index_bytes], count, index_bits)
        offset += index_bytes
        codes = _unpack(buffer[offset:], count, value_bits)
        if count and (codes.max(initial=0) >= max(1, levels) or positions.max(initial=0) >= numel):
            raise ValueError("a packed tensor's codes or positions are out of range")
        values = torch.as_tensor(codebook.copy())[torch.as_tensor(codes)] if levels else None
        out = torch.zeros(numel, dtype=torch.float32)
        if values is not None:
            if dense:
                out.copy_(values)
            else:
                out[torch.as_tensor(positions)] = values
        return out.view(shape)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 0.25  # parts stay about hivemind's size; the actual ratio varies by round


def _bits_for_index(numel: int) -> int:
    return max(1, math.ceil(math.log2(max(2, numel))))


__all__ = ["FeedbackCodec", "MAGIC", "Packed", "equal_count_levels"]
