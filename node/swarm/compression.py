"""What crosses the network: the run spec's compression names as hivemind compressions.

Owns :func:`compression` (``"none"``, ``"fp16"``, ``"8bit"``,
``"quantile-8bit"`` to a ``hivemind.compression.CompressionBase``),
:func:`bytes_on_wire`, and the fix that lets hivemind 1.1.12 decode its own
8-bit formats under numpy 2. Every kind sends hivemind's standard wire
formats, so any peer decodes what another sends whatever it chose. Knows
nothing about averaging, the swarm or the training loop.

How each kind treats a tensor (measured in ``tests/node/test_compression.py``
and on a small GPT's real gradients, pseudo-gradients and AdamW state):

- ``fp16`` is hivemind's mean-std scaled fp16 (``ScaledFloat16Compression``),
  not a plain cast: its error is 2e-4 of the tensor's norm at any magnitude,
  while a plain fp16 cast loses precision below 6e-5 (17% error on values
  around 1e-7, which small averaged gradients and the differences the
  all-reduce sends back reach). Half the bytes of fp32.
- ``8bit`` is hivemind's uniform 8-bit code (256 levels over mean ± 3 std,
  each level decoded as the mean of its values). A quarter of the bytes plus
  1 KiB of codebook per part. Values beyond 3 std are clipped to the edge
  level's mean: about 2% error on Gaussian values, 15-30% on heavy-tailed
  real gradients, 1.5-6% on DiLoCo pseudo-gradients. About 50 ms to encode
  4M values (hivemind's own encoder: 47 ms).
- ``quantile-8bit`` is hivemind's quantile code: 256 levels holding equal
  shares of the values. Same size; better on heavy tails (8-17% on real
  gradients, 2-3% on pseudo-gradients) but 5-8x slower to encode (250-400
  ms per 4M values; about 10 s of CPU per round for a 124M model).
- Parts under :data:`SMALL_PART` values go as scaled fp16 under both 8-bit
  kinds: the codebook would outweigh them, and they are the small tensors
  (norm gains) or tensors' last slivers.
- ``4bit``, ``2bit``, ``topk-4bit`` and ``topk-2bit`` are for DiLoCo's
  pseudo-gradients only: the trainer's error-feedback codec
  (:mod:`~crowdtrain.node.swarm.packed`) decides what is sent, and the wire
  carries it losslessly as positions and codes (``Packed``).
- Optimizer statistics (``TensorRole.OPTIMIZER``: AdamW's moments and step
  count, sent when a peer loads state) always go uncompressed: a plain fp16
  cast flushed a third of a real ``exp_avg_sq`` to zero (Adam then divides
  by eps), scaled fp16 fails on the 0-d step count, and 8-bit codes were 17%
  off. Compression therefore shrinks state transfers less than gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    NoCompression,
    Quantile8BitQuantization,
    ScaledFloat16Compression,
    TensorRole,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.compression import serialization as _serialization
from hivemind.proto import runtime_pb2

from crowdtrain.node.swarm.packed import FeedbackCodec, Packed
from crowdtrain.protocol.errors import SpecError

KINDS = ("none", "fp16", "8bit", "quantile-8bit")
"""The run spec's ``Compression`` names, in order of bytes sent."""

FEEDBACK_KINDS = {
    "4bit": (1.0, 4),
    "2bit": (1.0, 2),
    "topk-4bit": (None, 4),
    "topk-2bit": (None, 2),
}
"""Pseudo-gradient kinds sent through :class:`~crowdtrain.node.swarm.packed.FeedbackCodec`:
(share of each tensor sent, None for the run's ``pseudo_grad_topk``; bits per value)."""

SMALL_PART = 1 << 16
"""Parts with fewer values go as scaled fp16 under the 8-bit kinds (1 KiB codebook = 1.6%)."""


class _DecodesUnderNumpy2:
    """hivemind 1.1.12's 8-bit decoding, reading the codebook's length as numpy 2 allows.

    hivemind calls ``int()`` on a one-element array, which numpy 2.4 refuses,
    so every 8-bit part fails to decode. Same format, same result.
    """

    codebook_dtype: type
    indices_dtype: type

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook: np.ndarray = np.frombuffer(
            buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype
        )
        indices: np.ndarray = np.frombuffer(
            buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype
        )
        quantized = torch.as_tensor(indices, dtype=torch.int64).reshape(
            tuple(serialized_tensor.size)
        )
        levels = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return levels[quantized].requires_grad_(serialized_tensor.requires_grad)


class Uniform8Bit(_DecodesUnderNumpy2, Uniform8BitQuantization):
    """hivemind's uniform 8-bit code, encoded without ``torch.quantize_per_tensor``.

    PyTorch deprecates its quantized tensors (a warning on every process, removal
    announced); this computes the same levels with plain tensor ops. A
    constant or one-value part, whose deviation is 0 or undefined, goes to
    one level holding its exact mean.
    """

    def quantize(
        self, tensor: torch.Tensor, allow_inplace: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        tensor = tensor.detach().to(dtype=torch.float32, copy=not allow_inplace)
        offset = self.n_bins // 2
        centered = tensor - tensor.mean()
        std_unbiased = centered.norm() / math.sqrt(max(1, centered.numel() - 1))
        scale = float(self.RANGE_IN_SIGMAS * std_unbiased / self.n_bins)
        if scale > 0 and math.isfinite(scale):
            # In place on ``centered``, which is not needed after: one pass, no copies.
            levels = centered.mul_(1.0 / scale).round_().add_(offset).clamp_(0, self.n_bins - 1)
        else:
            levels = centered.fill_(offset)
        quantized = levels.to(torch.uint8)
        codebook = _level_means(tensor, quantized, self.n_bins)
        return quantized.numpy(), codebook.numpy()


class Quantile8Bit(_DecodesUnderNumpy2, Quantile8BitQuantization):
    """hivemind's quantile 8-bit code (levels holding equal shares of the values)."""


def _level_means(tensor: torch.Tensor, quantized: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The mean value of each level (0 for an empty one), as the decoder will read it."""
    index = quantized.flatten().long()
    sums = torch.zeros(n_bins, dtype=torch.float32).scatter_add_(0, index, tensor.flatten())
    counts = torch.bincount(index, minlength=n_bins).clamp_min_(1)
    return sums / counts


def install_decoders() -> None:
    """Make hivemind decode 8-bit parts under numpy 2 in this process (idempotent).

    hivemind decodes every received part through one registry of
    compressions by wire type; this puts the fixed 8-bit decoders there.
    :func:`compression` calls it, so a node that builds its optimizer from
    the run spec has it before hivemind forks its averager processes (which
    inherit it). A process that only receives (a state download) calls it
    itself.
    """
    registry = _serialization._BASE_COMPRESSION_TYPES
    if not isinstance(registry["UNIFORM_8BIT"], Uniform8Bit):
        registry["UNIFORM_8BIT"] = Uniform8Bit()
    if not isinstance(registry["QUANTILE_8BIT"], Quantile8Bit):
        registry["QUANTILE_8BIT"] = Quantile8Bit()
    if not isinstance(registry["BLOCKWISE_8BIT"], Packed):
        registry["BLOCKWISE_8BIT"] = Packed()


class CrowdtrainCompression(CompressionBase):
    """One run-spec kind: ``large`` for parts of :data:`SMALL_PART` values or more,
    ``small`` for smaller ones, optimizer statistics and 0-d tensors uncompressed.

    Decides from the part actually sent (hivemind cuts tensors into parts;
    the info describes the whole tensor), so the last sliver of a large
    tensor does not pay an 8-bit codebook.
    """

    def __init__(self, name: str, large: CompressionBase, small: CompressionBase) -> None:
        self.name, self.large, self.small = name, large, small
        self.lossless = NoCompression()

    def choose(self, tensor: torch.Tensor, info: CompressionInfo) -> CompressionBase:
        if info.role == TensorRole.OPTIMIZER or tensor.dim() == 0:
            return self.lossless
        if not torch.is_floating_point(tensor) or tensor.dtype == torch.bfloat16:
            # hivemind's 16- and 8-bit codes refuse these; send them as they are.
            return self.lossless
        return self.large if tensor.numel() >= SMALL_PART else self.small

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> runtime_pb2.Tensor:
        return self.choose(tensor, info).compress(tensor, info, allow_inplace=allow_inplace)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return deserialize_torch_tensor(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        if info.role == TensorRole.OPTIMIZER:
            return 1.0
        chosen = self.large if info.descriptor.numel() >= SMALL_PART else self.small
        return chosen.estimate_compression_ratio(info)

    def __repr__(self) -> str:
        return f"crowdtrain.compression({self.name!r})"


def compression(name: str) -> CompressionBase:
    """The hivemind compression for a run spec ``Compression`` name (see the module docstring).

    Also installs the 8-bit decoders this process needs (:func:`install_decoders`).
    Raises :class:`SpecError` naming the valid choices for anything else.
    """
    install_decoders()
    if name == "none":
        return NoCompression()
    if name == "fp16":
        scaled = ScaledFloat16Compression()
        return CrowdtrainCompression(name, scaled, scaled)
    if name == "8bit":
        return CrowdtrainCompression(name, Uniform8Bit(), ScaledFloat16Compression())
    if name == "quantile-8bit":
        return CrowdtrainCompression(name, Quantile8Bit(), ScaledFloat16Compression())
    if name in FEEDBACK_KINDS:
        # What the feedback codec left is sent as it is: few distinct values, often sparse.
        return CrowdtrainCompression(name, Packed(), Packed())
    kinds = (*KINDS, *FEEDBACK_KINDS)
    raise SpecError(
        f"unknown compression {name!r}; choose one of {', '.join(repr(k) for k in kinds)} "
        "(blockwise 8-bit needs bitsandbytes and is not offered)"
    )


def feedback_codec(name: str, topk: float) -> FeedbackCodec | None:
    """The error-feedback codec a pseudo-gradient kind needs (None for the others);
    ``topk`` is the run's ``pseudo_grad_topk``."""
    if name not in FEEDBACK_KINDS:
        return None
    fraction, bits = FEEDBACK_KINDS[name]
    return FeedbackCodec(topk if fraction is None else fraction, bits)


def bytes_on_wire(
    name: str, tensor: torch.Tensor, role: TensorRole = TensorRole.UNSPECIFIED
) -> int:
    """Serialized bytes of ``tensor`` sent whole under compression ``name``.

    The protobuf message's size, header included. hivemind's all-reduce cuts
    tensors into parts of about 512 KiB and each 8-bit part carries its own
    1 KiB codebook, so large tensors cost slightly more than this in parts.
    """
    info = CompressionInfo.from_tensor(tensor, role=role)
    return compression(name).compress(tensor.detach().cpu(), info).ByteSize()


__all__ = [
    "FEEDBACK_KINDS",
    "KINDS",
    "SMALL_PART",
    "CrowdtrainCompression",
    "Quantile8Bit",
    "Uniform8Bit",
    "bytes_on_wire",
    "compression",
    "feedback_codec",
    "install_decoders",
]
