import pytest

from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.messages import (
    Evaluation,
    HeartbeatPayload,
    PayloadError,
    ReceiptPayload,
    RegisterPayload,
    parse_payload,
)

REGISTER = {
    "challenge": b"c" * 32,
    "name": "laptop",
    "device": "cuda:0 NVIDIA H100",
    "versions": "crowdtrain 0.1.0",
}
HEARTBEAT = {
    "session_key": "0123456789abcdef",
    "num_tokens": 4096,
    "num_sequences": 32,
    "tokens_per_s": 1500.5,
    "loss": 2.5,
    "step": 3,
    "device": "cpu",
    "evaluations": [{"step": 3, "num_tokens": 4096, "loss": 2.4, "bits_per_byte": 3.46}],
}
RECEIPT = {
    "shard_id": "train-00000",
    "epoch": 0,
    "num_sequences": 31,
    "num_tokens": 992,
    "loss_sum": 80.5,
    "started": 1_700_000_000.0,
    "finished": 1_700_000_010.0,
}


def _error(model, payload) -> str:
    with pytest.raises(PayloadError) as info:
        parse_payload(model, payload)
    assert isinstance(info.value, CrowdtrainError)
    return str(info.value)


def test_register_payload_parses():
    info = parse_payload(RegisterPayload, REGISTER)
    assert (info.name, info.device, info.versions) == (
        "laptop",
        "cuda:0 NVIDIA H100",
        "crowdtrain 0.1.0",
    )
    minimal = {"challenge": b"c" * 16, "name": "n", "device": ""}
    assert parse_payload(RegisterPayload, minimal).versions == ""
    assert parse_payload(RegisterPayload, minimal).invite == ""


def test_heartbeat_payload_parses_with_evaluation():
    beat = parse_payload(HeartbeatPayload, HEARTBEAT)
    assert beat.num_tokens == 4096 and beat.step == 3
    assert isinstance(beat.evaluations[0], Evaluation)
    assert beat.evaluations[0].loss == 2.4


def test_heartbeat_payload_defaults():
    minimal = {k: HEARTBEAT[k] for k in ("session_key", "num_tokens", "num_sequences", "step")}
    beat = parse_payload(HeartbeatPayload, {**minimal, "tokens_per_s": 0})
    assert beat.loss is None and beat.evaluations == [] and beat.device == ""
    assert beat.tokens_per_s == 0.0


def test_receipt_payload_parses():
    receipt = parse_payload(ReceiptPayload, RECEIPT)
    assert receipt.shard_id == "train-00000"
    assert receipt.num_tokens == 992
    assert receipt.finished - receipt.started == 10.0


def test_parsed_payload_is_frozen():
    receipt = parse_payload(ReceiptPayload, RECEIPT)
    with pytest.raises(ValueError):
        receipt.num_tokens = 10**9


@pytest.mark.parametrize(
    "model, payload, field",
    [
        (RegisterPayload, {**REGISTER, "admin": True}, "admin"),
        (HeartbeatPayload, {**HEARTBEAT, "credits": 10}, "credits"),
        (ReceiptPayload, {**RECEIPT, "peer_id": "someone-else"}, "peer_id"),
        (
            HeartbeatPayload,
            {**HEARTBEAT, "evaluations": [{**HEARTBEAT["evaluations"][0], "extra": 1}]},
            "evaluations.0.extra",
        ),
    ],
)
def test_extra_keys_are_refused(model, payload, field):
    message = _error(model, payload)
    assert f"bad {model.__name__}: {field}:" in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    "model, payload, field",
    [
        (HeartbeatPayload, {**HEARTBEAT, "num_tokens": -1}, "num_tokens"),
        (HeartbeatPayload, {**HEARTBEAT, "num_sequences": -5}, "num_sequences"),
        (HeartbeatPayload, {**HEARTBEAT, "step": -1}, "step"),
        (HeartbeatPayload, {**HEARTBEAT, "tokens_per_s": -0.5}, "tokens_per_s"),
        (ReceiptPayload, {**RECEIPT, "epoch": -1}, "epoch"),
        (ReceiptPayload, {**RECEIPT, "num_tokens": -992}, "num_tokens"),
        (ReceiptPayload, {**RECEIPT, "loss_sum": -1.0}, "loss_sum"),
        (
            HeartbeatPayload,
            {**HEARTBEAT, "evaluations": [{**HEARTBEAT["evaluations"][0], "num_tokens": -1}]},
            "evaluations.0.num_tokens",
        ),
    ],
)
def test_negative_counts_are_refused(model, payload, field):
    message = _error(model, payload)
    assert f"bad {model.__name__}: {field}:" in message
    assert "greater than or equal to 0" in message


def test_counts_beyond_the_bound_are_refused():
    assert "num_tokens" in _error(HeartbeatPayload, {**HEARTBEAT, "num_tokens": 2**62 + 1})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "model, base, field",
    [
        (HeartbeatPayload, HEARTBEAT, "tokens_per_s"),
        (HeartbeatPayload, HEARTBEAT, "loss"),
        (ReceiptPayload, RECEIPT, "loss_sum"),
        (ReceiptPayload, RECEIPT, "started"),
        (ReceiptPayload, RECEIPT, "finished"),
    ],
)
def test_non_finite_floats_are_refused(model, base, field, value):
    message = _error(model, {**base, field: value})
    assert f"bad {model.__name__}: {field}:" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_evaluation_loss_is_refused(value):
    payload = {**HEARTBEAT, "evaluations": [{**HEARTBEAT["evaluations"][0], "loss": value}]}
    assert "bad HeartbeatPayload: evaluations.0.loss:" in _error(HeartbeatPayload, payload)


@pytest.mark.parametrize(
    "model, payload, field",
    [
        (HeartbeatPayload, {**HEARTBEAT, "num_tokens": "4096"}, "num_tokens"),
        (HeartbeatPayload, {**HEARTBEAT, "step": 3.0}, "step"),
        (HeartbeatPayload, {**HEARTBEAT, "step": True}, "step"),
        (HeartbeatPayload, {**HEARTBEAT, "tokens_per_s": "fast"}, "tokens_per_s"),
        (HeartbeatPayload, {**HEARTBEAT, "evaluations": [1, 2]}, "evaluations.0"),
        (
            HeartbeatPayload,
            {**HEARTBEAT, "evaluations": HEARTBEAT["evaluations"] * 33},
            "evaluations",
        ),
        (ReceiptPayload, {**RECEIPT, "epoch": "0"}, "epoch"),
        (ReceiptPayload, {**RECEIPT, "shard_id": 7}, "shard_id"),
        (RegisterPayload, {**REGISTER, "name": b"laptop"}, "name"),
        (RegisterPayload, {**REGISTER, "device": None}, "device"),
    ],
)
def test_wrong_types_are_refused(model, payload, field):
    assert f"bad {model.__name__}: {field}:" in _error(model, payload)


@pytest.mark.parametrize(
    "model, payload, field",
    [
        (RegisterPayload, {**REGISTER, "name": "x" * 65}, "name"),
        (RegisterPayload, {**REGISTER, "name": ""}, "name"),
        (RegisterPayload, {**REGISTER, "device": "d" * 129}, "device"),
        (RegisterPayload, {**REGISTER, "versions": "v" * 513}, "versions"),
        (HeartbeatPayload, {**HEARTBEAT, "session_key": "short"}, "session_key"),
        (HeartbeatPayload, {**HEARTBEAT, "session_key": "k" * 65}, "session_key"),
        (ReceiptPayload, {**RECEIPT, "shard_id": "s" * 65}, "shard_id"),
    ],
)
def test_text_of_wrong_length_is_refused(model, payload, field):
    message = _error(model, payload)
    assert f"bad {model.__name__}: {field}:" in message
    assert "at most" in message or "at least" in message


@pytest.mark.parametrize("model", [RegisterPayload, HeartbeatPayload, ReceiptPayload])
def test_missing_required_field_is_refused(model):
    assert "Field required" in _error(model, {})


@pytest.mark.parametrize(
    "model, payload, field",
    [
        (RegisterPayload, {**REGISTER, "challenge": b"short"}, "challenge"),
        (RegisterPayload, {**REGISTER, "challenge": "c" * 32}, "challenge"),
        (RegisterPayload, {**REGISTER, "invite": "i" * 129}, "invite"),
        (HeartbeatPayload, {**HEARTBEAT, "progress_key": "not hex"}, "progress_key"),
        (HeartbeatPayload, {**HEARTBEAT, "dht_peer_id": "p" * 129}, "dht_peer_id"),
        (
            HeartbeatPayload,
            {**HEARTBEAT, "reports": [{"dht_peer_id": "p", "reason": "nan", "count": 0}]},
            "reports",
        ),
        (
            HeartbeatPayload,
            {**HEARTBEAT, "reports": [{"dht_peer_id": "p", "reason": "nan", "count": 1}] * 33},
            "reports",
        ),
        (
            ReceiptPayload,
            {**RECEIPT, "samples": [{"step": 1, "batch": 0, "losses": [float("nan")]}]},
            "samples",
        ),
        (
            ReceiptPayload,
            {**RECEIPT, "samples": [{"step": 1, "batch": 0, "losses": [1.0] * 257}]},
            "samples",
        ),
        (
            ReceiptPayload,
            {
                **RECEIPT,
                "samples": [{"step": 1, "batch": b, "losses": [1.0] * 256} for b in range(17)],
            },
            "4352 losses in all",
        ),
        (ReceiptPayload, {**RECEIPT, "micro_batch_size": 0}, "micro_batch_size"),
    ],
)
def test_trust_fields_are_bounded(model, payload, field):
    assert field in _error(model, payload)


def test_trust_fields_parse():
    beat = parse_payload(
        HeartbeatPayload,
        {
            **HEARTBEAT,
            "dht_peer_id": "12D3KooW",
            "progress_key": "00ff",
            "num_skipped_steps": 2,
            "reports": [{"dht_peer_id": "12D3KooX", "reason": "non-finite", "count": 3}],
        },
    )
    assert beat.reports[0].count == 3 and beat.num_skipped_steps == 2
    receipt = parse_payload(
        ReceiptPayload,
        {**RECEIPT, "micro_batch_size": 8, "samples": [{"step": 4, "batch": 2, "losses": [2.5]}]},
    )
    assert receipt.samples[0].losses == [2.5]
