"""Low-bit and top-k pseudo-gradients: the error-feedback codec and the packed wire format."""

from __future__ import annotations

import struct

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from crowdtrain.node.swarm.allreduce import _deserialize_part
from crowdtrain.node.swarm.compression import compression, feedback_codec
from crowdtrain.node.swarm.packed import MAGIC, FeedbackCodec, Packed, equal_count_levels
from crowdtrain.protocol.errors import SpecError
from crowdtrain.protocol.runspec import parse_spec
from tests.specs import small_spec


def _wire(name: str, tensor: torch.Tensor):
    return compression(name).compress(tensor, CompressionInfo.from_tensor(tensor))


@pytest.mark.parametrize("name", ["topk-2bit", "topk-4bit", "4bit", "2bit"])
def test_what_the_codec_sends_crosses_the_wire_unchanged(name: str) -> None:
    codec = feedback_codec(name, 1 / 64)
    assert codec is not None
    tensors = [torch.randn(200_000), torch.randn(64, 33)]
    wanted = [t.clone() for t in tensors]
    codec.encode_(tensors)
    assert codec.residuals is not None
    for sent, residual, original in zip(tensors, codec.residuals, wanted, strict=True):
        # Sent plus kept is what there was to send.
        torch.testing.assert_close(sent + residual, original, rtol=0, atol=1e-6)
        assert len(torch.unique(sent[sent != 0])) <= 1 << codec.bits
        assert torch.equal(deserialize_torch_tensor(_wire(name, sent)), sent)


def test_sizes_on_the_wire_against_fp32() -> None:
    tensor = torch.randn(131_072)
    fp32 = 4 * tensor.numel()
    sizes = {}
    for name in ("topk-2bit", "topk-4bit", "4bit", "2bit"):
        sent = [tensor.clone()]
        codec = feedback_codec(name, 1 / 64)
        assert codec is not None
        codec.encode_(sent)
        sizes[name] = fp32 / _wire(name, sent[0]).ByteSize()
    # Positions cost 17 bits each here, values 2 or 4: about 1/64 * 19/32 of fp32.
    assert sizes["topk-2bit"] > 100, sizes
    assert sizes["topk-4bit"] > 90, sizes
    assert 7.9 < sizes["4bit"] < 8.0 and 15.8 < sizes["2bit"] < 16.0, sizes


def test_error_feedback_sends_everything_in_the_end() -> None:
    """Round after round of the same pseudo-gradient, the sum of what was sent catches up
    with the sum of what there was to send: what is held back stays bounded, so its
    share shrinks as 1/rounds. Without feedback, top-k keeps missing the same 63/64."""
    codec = FeedbackCodec(1 / 64, 2)
    delta = torch.randn(4096)
    total_sent = torch.zeros(4096)
    errors = {}
    for round_ in range(1, 801):
        sent = [delta.clone()]
        codec.encode_(sent)
        total_sent += sent[0]
        if round_ in (200, 800):
            errors[round_] = float((total_sent - round_ * delta).norm() / (round_ * delta).norm())
    assert errors[800] < 0.35 * errors[200] and errors[800] < 0.08, errors
    without = [delta.clone()]
    FeedbackCodec(1 / 64, 2).encode_(without)
    assert float((without[0] - delta).norm() / delta.norm()) > 0.9


def test_a_reducers_average_is_recoded_in_256_levels() -> None:
    average = torch.randn(50_000) * (torch.rand(50_000) < 0.05)
    back = deserialize_torch_tensor(_wire("topk-2bit", average))
    assert torch.equal(back == 0, average == 0)  # the same positions
    assert float((back - average).norm() / average.norm()) < 0.05
    assert len(torch.unique(back)) <= 257
    assert equal_count_levels(torch.arange(10.0), 4).unique().numel() == 4


def test_zero_and_empty_parts() -> None:
    for tensor in (torch.zeros(1000), torch.zeros(0), torch.zeros(3, 0)):
        back = deserialize_torch_tensor(_wire("topk-2bit", tensor))
        assert back.shape == tensor.shape and not back.any()


def _forged(count: int, levels: int, index_bits: int, payload: bytes, shape=(100,)):
    header = struct.pack("<4sBBBxQQ", MAGIC, 1, 2, index_bits, count, levels)
    tensor = _wire("topk-2bit", torch.zeros(shape))
    tensor.buffer = header + payload
    return tensor


@pytest.mark.parametrize(
    "forged",
    [
        _forged(count=10**9, levels=4, index_bits=7, payload=b"\0" * 64),  # more than fit
        _forged(count=3, levels=4, index_bits=7, payload=b"\0" * 16 + b"\xff" * 4),  # position 127
        _forged(count=3, levels=300, index_bits=7, payload=b""),  # too many levels
        _forged(count=50, levels=4, index_bits=0, payload=b"\0" * 16 + b"\xff" * 13),  # dense
    ],
)
def test_a_hostile_packed_part_is_malformed_not_a_crash(forged) -> None:
    with pytest.raises(ValueError):
        Packed().extract(forged)
    # In the all-reduce it is a malformed part: its sender is dropped and reported.
    message = type("Message", (), {"tensor_part": forged, "weight": 1.0})()
    part, _, _ = _deserialize_part(message)
    assert part is None


def test_the_run_spec_offers_them_for_pseudo_gradients_only() -> None:
    spec = parse_spec(
        small_spec(optimizer={"mode": "diloco", "pseudo_grad_compression": "topk-2bit"})
    )
    assert spec.optimizer.pseudo_grad_topk == 1 / 64
    with pytest.raises(SpecError, match="grad_compression"):
        parse_spec(small_spec(optimizer={"grad_compression": "topk-2bit"}))
    with pytest.raises(SpecError, match="pseudo_grad_topk"):
        parse_spec(small_spec(optimizer={"mode": "diloco", "pseudo_grad_topk": 0.0}))
    assert feedback_codec("8bit", 0.1) is None
