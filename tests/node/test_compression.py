"""The run spec's compression kinds: round-trip error, bytes on the wire, refusals.

Error bounds are relative to the tensor's norm and follow from each code:

- scaled fp16 keeps 11 significant bits of each value's deviation from the
  mean, so its error is at most the unit roundoff 2**-11 = 4.9e-4 (2.1e-4
  measured), at any magnitude;
- uniform 8-bit has 256 levels over mean +- 3 std: the levels alone cost
  0.7% and clipping the 0.27% of Gaussian values beyond 3 std about 1.5%
  (1.6% measured), bound 2.5%;
- quantile 8-bit spends its 256 levels on equal shares of the values, so
  its outer levels are wide on a Gaussian (2.8% measured), bound 4%;
- a few outliers at 10 std hold 1.5% of a pseudo-gradient's energy and
  are clipped by both 8-bit codes to their edge level (8-9% measured),
  bound 12%; the bulk stays within the Gaussian bound.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hivemind.compression import (
    CompressionInfo,
    TensorRole,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)

from crowdtrain.node.swarm.compression import KINDS, SMALL_PART, bytes_on_wire, compression
from crowdtrain.protocol.errors import SpecError

N = 1 << 17
ROUNDOFF_FP16 = 2.0**-11


def _round_trip(
    kind: str, tensor: torch.Tensor, role: TensorRole = TensorRole.UNSPECIFIED
) -> torch.Tensor:
    info = CompressionInfo.from_tensor(tensor, role=role)
    return deserialize_torch_tensor(compression(kind).compress(tensor, info))


def _rel_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded - original).norm() / original.norm())


def _gradient(scale: float = 1e-3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=generator) * scale


def _pseudo_gradient(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A DiLoCo-like update (std 1e-2) with 20 outliers at 10 std; and where they are."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(N, generator=generator) * 1e-2
    outliers = torch.randperm(N, generator=generator)[:20]
    values[outliers] = 0.1 * torch.sign(torch.randn(20, generator=generator))
    return values, outliers


def test_none_is_exact_and_fp32_sized() -> None:
    grad = _gradient()
    assert torch.equal(_round_trip("none", grad), grad)
    assert 4 * N <= bytes_on_wire("none", grad) <= 4 * N + 64


@pytest.mark.parametrize(
    ("kind", "bound"), [("fp16", ROUNDOFF_FP16), ("8bit", 0.025), ("quantile-8bit", 0.04)]
)
def test_gradient_round_trip_within_bound(kind: str, bound: float) -> None:
    grad = _gradient()
    decoded = _round_trip(kind, grad)
    assert decoded.shape == grad.shape and decoded.dtype == grad.dtype
    assert _rel_error(decoded, grad) < bound


def test_fp16_keeps_tiny_gradients() -> None:
    # A plain fp16 cast is 17% off here (values near its subnormal range).
    tiny = _gradient(scale=1e-7)
    assert _rel_error(_round_trip("fp16", tiny), tiny) < ROUNDOFF_FP16


@pytest.mark.parametrize("kind", ["8bit", "quantile-8bit"])
def test_pseudo_gradient_outliers_are_clipped_not_amplified(kind: str) -> None:
    pseudo, outliers = _pseudo_gradient()
    decoded = _round_trip(kind, pseudo)
    assert _rel_error(decoded, pseudo) < 0.12
    bulk = torch.ones(N, dtype=torch.bool)
    bulk[outliers] = False
    assert _rel_error(decoded[bulk], pseudo[bulk]) < 0.04
    # Levels are means of the values they hold: nothing comes back larger, and
    # the outliers keep their sign at the far edge of the range.
    assert decoded.abs().max() <= pseudo.abs().max()
    assert torch.equal(torch.sign(decoded[outliers]), torch.sign(pseudo[outliers]))
    assert bool((decoded[outliers].abs() > 2.5e-2).all())


def test_fp16_pseudo_gradient() -> None:
    pseudo, _ = _pseudo_gradient()
    assert _rel_error(_round_trip("fp16", pseudo), pseudo) < ROUNDOFF_FP16


@pytest.mark.parametrize(
    ("kind", "ratio"), [("fp16", 0.5), ("8bit", 0.25), ("quantile-8bit", 0.25)]
)
def test_sizes_shrink(kind: str, ratio: float) -> None:
    grad = _gradient()
    codebook = 8 + 256 * 4 if "8bit" in kind else 0
    header = 64
    assert ratio * 4 * N <= bytes_on_wire(kind, grad) <= ratio * 4 * N + codebook + header


@pytest.mark.parametrize("kind", ["8bit", "quantile-8bit"])
def test_small_parts_go_as_fp16(kind: str) -> None:
    # An 8-bit codebook (1 KiB) would outweigh a norm's gain or a tensor's last sliver.
    gain = torch.ones(768) + 0.01 * torch.randn(768)
    assert gain.numel() < SMALL_PART
    assert bytes_on_wire(kind, gain) <= 2 * 768 + 64
    assert _rel_error(_round_trip(kind, gain), gain) < ROUNDOFF_FP16


@pytest.mark.parametrize("kind", KINDS)
def test_optimizer_statistics_travel_exact(kind: str) -> None:
    # AdamW's second moments are tiny and non-negative: 16- or 8-bit codes zero or
    # distort them, and its step count is a 0-d tensor.
    exp_avg_sq = torch.rand(N) ** 4 * 1e-8
    assert torch.equal(_round_trip(kind, exp_avg_sq, TensorRole.OPTIMIZER), exp_avg_sq)
    step = torch.tensor(10_001.0)
    assert torch.equal(_round_trip(kind, step, TensorRole.OPTIMIZER), step)
    assert torch.equal(_round_trip(kind, step), step)


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_parts_decode_exactly(kind: str) -> None:
    for part in (torch.zeros(SMALL_PART), torch.full((SMALL_PART,), 3.0), torch.tensor([0.5])):
        assert torch.equal(_round_trip(kind, part), part)


def test_stock_hivemind_8bit_parts_decode() -> None:
    """A peer encoding with hivemind's own class is understood (and numpy 2 decodes it)."""
    compression("8bit")  # installs the decoders
    grad = _gradient()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized tensors it uses
        message = Uniform8BitQuantization().compress(grad, CompressionInfo.from_tensor(grad))
    assert _rel_error(deserialize_torch_tensor(message), grad) < 0.025


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(SpecError) as error:
        compression("blockwise-8bit")
    message = str(error.value)
    assert "'blockwise-8bit'" in message
    for kind in KINDS:
        assert repr(kind) in message
