"""Throughput samples: what the sampler records for each run, and how the table stays bounded."""

from __future__ import annotations

import shutil

import pytest

from crowdtrain.coordinator.records import PEER_TIMEOUT_S, UnknownRunError, get_run
from crowdtrain.coordinator.runs import peers
from crowdtrain.coordinator.runs.publish import prepare_publication, publish
from crowdtrain.coordinator.runs.samples import MAX_EVALS_PER_RUN, metrics_view, take_samples
from crowdtrain.coordinator.runs.views import run_view
from crowdtrain.protocol.messages import HeartbeatPayload
from tests.coordinator.registration import COORDINATOR_KEY, join_peer
from tests.swarm import write_spec


@pytest.fixture
def run(store, prepared, tmp_path):
    data = shutil.copytree(prepared, tmp_path / "data")
    spec = write_spec(tmp_path / "run.toml", run_id="samples")
    spec.write_text(spec.read_text().replace("seq_len = 64", "seq_len = 32"))
    result = publish(store, prepare_publication(spec, data), COORDINATOR_KEY)
    return get_run(store, result.run_id)


def beat(num_tokens: int, tokens_per_s: float, step: int) -> HeartbeatPayload:
    return HeartbeatPayload(
        session_key="session-samples",
        num_tokens=num_tokens,
        num_sequences=num_tokens // 32,
        tokens_per_s=tokens_per_s,
        step=step,
    )


def test_a_run_is_sampled_only_while_peers_are_live(run, store):
    assert take_samples(store) == 0 and metrics_view(store, run.id) == []
    first, second = join_peer(store, run.id), join_peer(store, run.id, name="desktop")
    peers.heartbeat(store, first, beat(640, 120.0, 3))
    peers.heartbeat(store, second, beat(320, 80.0, 2))
    seen = store.get_peer(run.id, first.peer_id)["last_seen"]

    assert take_samples(store, now=seen + 1) == 1
    [sample] = metrics_view(store, run.id)
    assert sample == {
        "time": seen + 1,
        "step": 2,  # the lower median of the live peers' steps (3 and 2)
        "num_tokens": 960,
        "tokens_per_s": 200.0,
        "num_peers": 2,
    }
    # Gone peers (no heartbeat for PEER_TIMEOUT_S) are not sampled.
    assert take_samples(store, now=seen + PEER_TIMEOUT_S + 5) == 0
    assert metrics_view(store, run.id, since=seen + 1) == []
    with pytest.raises(UnknownRunError, match="no run 'nope'"):
        metrics_view(store, "nope")


def test_samples_are_thinned_past_the_limit(run, store):
    session = join_peer(store, run.id)
    peers.heartbeat(store, session, beat(64, 10.0, 1))
    start = store.get_peer(run.id, session.peer_id)["last_seen"]
    for i in range(21):
        take_samples(store, now=start + i * 0.1, max_samples=20)
    times = [s["time"] for s in metrics_view(store, run.id)]
    # The 21st sample went over 20: every second one of the oldest 10 was dropped.
    assert len(times) == 16
    assert times[5:] == [start + i * 0.1 for i in range(10, 21)]
    assert times[:5] == [start + i * 0.1 for i in range(0, 10, 2)]
    assert times == sorted(times)


def test_an_evaluation_is_placed_at_the_swarms_tokens_when_it_was_measured() -> None:
    from crowdtrain.coordinator.store.runs import _swarm_tokens_at

    # The node measured at 10,000 of its own tokens and has trained 2,000 more since; the
    # swarm runs at 3x its speed and stands at 100,000: it was at 94,000.
    update = {"num_tokens": 12_000, "tokens_per_s": 1_000.0}
    assert _swarm_tokens_at({"num_tokens": 10_000}, update, 100_000, 3_000.0) == 94_000
    # Alone, or not yet timed: its own tokens since, taken off once.
    assert _swarm_tokens_at({"num_tokens": 10_000}, update, 12_000, 1_000.0) == 10_000
    idle = {"num_tokens": 12_000, "tokens_per_s": 0.0}
    assert _swarm_tokens_at({"num_tokens": 10_000}, idle, 50_000, 0.0) == 48_000
    # Never below zero, whatever a node reports.
    assert _swarm_tokens_at({"num_tokens": 0}, update, 1_000, 3_000.0) == 0


def test_evaluations_are_thinned_past_the_limit_and_the_run_view_reads_their_ends(run, store):
    rows = [(run.id, i, i * 64, 5.0 - i * 1e-4, 7.0, "p", 1000.0 + i, i) for i in range(25_000)]
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO evals (run_id, step, num_tokens, val_loss, bits_per_byte, peer_id,"
            " time, swarm_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    take_samples(store)
    kept = store.list_evals(run.id)
    assert len(kept) <= MAX_EVALS_PER_RUN
    # The curve keeps its ends and its recent half whole.
    assert kept[0]["step"] == 0 and kept[-1]["step"] == 24_999
    assert [e["step"] for e in kept[-12_500:]] == list(range(12_500, 25_000))
    view = run_view(store, run.id)
    assert view["val_step"] == 24_999 and view["first_val_loss"] == 5.0
