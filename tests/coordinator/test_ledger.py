"""The contribution ledger on a real store: each receipt checked three ways, credit and shares.

Receipts go through the same LeaseBook and Ledger calls the gRPC handler makes;
the DHT's evidence is a ProgressHistory filled by the test. Spot checks, the third
check, are tested in test_spot_checks.py. No process, no network, no sleep.
"""

import json
import time

import pytest

from crowdtrain.coordinator.ledger import checks
from crowdtrain.coordinator.ledger import views as ledger_views
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.runs.views import peers_view
from crowdtrain.coordinator.swarm.dht import ProgressObservation, subkey_hex
from crowdtrain.protocol.devices import device_peak, peak_flops
from crowdtrain.protocol.errors import SpecError
from crowdtrain.protocol.runspec import parse_spec
from tests.coordinator.ledger_support import (
    CAPACITY,
    MICRO_BATCH,
    SEQ_LEN,
    STEP,
    Peer,
    check_row,
    ledger_spec,
    receipt,
    submit,
)

# (a) possible


def test_an_honest_receipt_is_verified_and_credited(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    assert submit(store, book, Ledger(store, history), peer, receipt(shard, start)) == "verified"

    row = check_row(store, peer, shard)
    assert (row["possible"], row["dht"], row["spot"]) == ("ok", "ok", "not selected")
    (entry,) = ledger_views.leaderboard_view(store, run)
    assert entry["verified_tokens"] == CAPACITY * SEQ_LEN
    assert entry["verified_flops"] == pytest.approx(
        CAPACITY * SEQ_LEN * checks.flops_per_token(run.spec)
    )
    assert entry["verified_share"] == 1.0 and entry["verified_fraction"] == 1.0
    assert entry["flagged"] is None
    (shown,) = peers_view(store, run.id)
    assert shown["verified_share"] == 1.0


def test_more_sequences_than_the_shard_holds_is_rejected_and_flags_the_peer(
    store, run, history, book
):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    forged = receipt(shard, start, num_sequences=10 * CAPACITY)
    assert submit(store, book, Ledger(store, history), peer, forged) == "rejected"

    row = check_row(store, peer, shard)
    assert row["possible"] == "failed" and f"at most {CAPACITY}" in row["reason"]
    flagged = store.get_peer(run.id, peer.session.peer_id)["flagged"]
    assert shard in flagged and f"at most {CAPACITY}" in flagged
    (entry,) = ledger_views.leaderboard_view(store, run)
    assert entry["verified_tokens"] == 0 and entry["num_rejected"] == 1
    # Stored bounded by what the shard holds (the claim is in the reason), never credited.
    assert entry["num_tokens"] == CAPACITY * SEQ_LEN


def test_tokens_that_do_not_match_sequences_are_rejected(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    padded = receipt(shard, start).model_copy(update={"num_tokens": CAPACITY * SEQ_LEN * 10})
    assert submit(store, book, Ledger(store, history), peer, padded) == "rejected"
    assert "tokens for" in check_row(store, peer, shard)["reason"]


def test_time_before_the_lease_was_granted_does_not_count(store, run, history, book):
    """A resumed shard may say it started before its lease (granted again); the rates
    are judged over the time under lease only, so spreading a claim thin gains nothing."""
    peer = Peer(store, run, history, rate=0.5)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start - 3600, start + 10)
    # 28 sequences "over an hour and ten seconds": 2 * 0.5 * 3620 would allow them all,
    # but under the lease it is ten seconds: 2 * 0.5 * (10 + 5 + 10) = 25 < 28.
    payload = receipt(shard, start - 3600, duration=3610)
    the_ledger = Ledger(store, history)
    assert submit(store, book, the_ledger, peer, payload) == "pending"
    the_ledger.recheck_waiting(run, now=start + 30)
    row = check_row(store, peer, shard)
    assert row["possible"] == "ok" and row["status"] == "rejected", row
    assert "sequences/s" in row["reason"]


def test_finishing_after_the_receipt_arrived_is_impossible(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    payload = receipt(shard, start)
    status = submit(store, book, Ledger(store, history), peer, payload, received_at=start + 1)
    assert status == "rejected"
    assert "after the receipt arrived" in check_row(store, peer, shard)["reason"]


def test_a_node_clock_that_runs_ahead_is_allowed_for(store, run, history, book):
    """Times are moved onto the coordinator's clock with the offset the envelope shows."""
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    skew = 90.0
    payload = receipt(shard, start + skew)  # the node's clock says 90 s later
    received = start + 10.5
    status = submit(
        store,
        book,
        Ledger(store, history),
        peer,
        payload,
        sent_at=received + skew,
        received_at=received,
    )
    assert status == "verified", check_row(store, peer, shard)["reason"]


def test_a_rate_beyond_the_devices_peak_is_impossible(run):
    granted = 1000.0
    payload = receipt(run.manifest.train_shards[0].id, granted, duration=1e-6)
    times = checks.receipt_times(
        payload, sent_at=granted + 1, granted_at=granted, received_at=granted + 1
    )
    check = checks.check_possible(run, payload, times, "cpu:1")
    assert check.failed and "peak" in check.reason and "CPU, 1 threads" in check.reason
    # The same claim over ten seconds is possible on one thread.
    slow = receipt(run.manifest.train_shards[0].id, granted, duration=10.0)
    times = checks.receipt_times(
        slow, sent_at=granted + 11, granted_at=granted, received_at=granted + 11
    )
    assert not checks.check_possible(run, slow, times, "cpu:1").failed


def test_device_peaks():
    assert device_peak("cuda:NVIDIA A100-SXM4-80GB").name == "A100"
    assert device_peak("cuda:NVIDIA A10G").name == "A10G"
    assert device_peak("cuda:NVIDIA H100 80GB HBM3").bf16_flops == pytest.approx(989e12)
    assert device_peak("cuda:NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert device_peak("cuda:Some Future GPU").name == "unknown GPU"
    assert peak_flops("cuda:Some Future GPU") >= peak_flops("cuda:NVIDIA B200")
    assert peak_flops("cpu:4") == pytest.approx(4 * peak_flops("cpu:1"))
    assert peak_flops("cpu") == peak_flops("cpu:256")  # thread count unknown: generous
    assert peak_flops("mps") < peak_flops("cuda:NVIDIA H100 80GB HBM3")
    assert peak_flops("") == peak_flops("cuda:Some Future GPU")


# (b) agreement with the DHT


def test_a_rate_far_above_what_the_dht_showed_is_rejected(store, run, history, book):
    peer = Peer(store, run, history, rate=0.1)  # its records said 0.1 sequences/s
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    the_ledger = Ledger(store, history)
    # A record read later might still show a higher rate: it waits for the whole window.
    assert submit(store, book, the_ledger, peer, receipt(shard, start)) == "pending"
    assert check_row(store, peer, shard)["dht"] == "waiting"
    assert the_ledger.recheck_waiting(run, now=start + 15) == 0
    assert the_ledger.recheck_waiting(run, now=start + 10 + checks.DHT_WINDOW_SLACK_S) == 1
    row = check_row(store, peer, shard)
    assert row["status"] == "rejected" and row["dht"] == "failed"
    assert "sequences/s" in row["reason"]
    assert store.get_peer(run.id, peer.session.peer_id)["flagged"]


def test_dht_evidence_read_after_the_receipt_arrived_counts(store, run, history, book):
    """A short shard can end before the coordinator's next read of the DHT."""
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    the_ledger = Ledger(store, history)
    assert submit(store, book, the_ledger, peer, receipt(shard, start, duration=1.0)) == "pending"
    peer.publish_progress(start + 2, start + 4)  # read after the receipt came
    assert the_ledger.recheck_waiting(run, now=start + 4) == 1
    assert check_row(store, peer, shard)["status"] == "verified"


def test_within_the_tolerance_of_the_dht_rate_is_verified(store, run, history, book):
    # 28 sequences in 10 s is 2.8/s; records showing 1.0/s allow 2 * 1.0 * (10 + 10) = 40.
    peer = Peer(store, run, history, rate=1.0)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    assert submit(store, book, Ledger(store, history), peer, receipt(shard, start)) == "verified"


def test_samples_from_steps_before_the_dht_showed_are_rejected(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start - 10, start + 10, epochs=(30, 31, 32, 33))
    losses = [5.0] * MICRO_BATCH
    old = [{"step": 3, "batch": 0, "losses": losses}, {"step": 32, "batch": 1, "losses": losses}]
    payload = receipt(shard, start, samples=old)
    assert submit(store, book, Ledger(store, history), peer, payload) == "rejected"
    assert "sample at step 3" in check_row(store, peer, shard)["reason"]


def test_samples_whose_steps_go_backwards_are_rejected(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    back = [
        {"step": STEP + 1, "batch": 0, "losses": [5.0] * MICRO_BATCH},
        {"step": STEP, "batch": 1, "losses": [5.0] * MICRO_BATCH},
    ]
    payload = receipt(shard, start, samples=back)
    assert submit(store, book, Ledger(store, history), peer, payload) == "rejected"
    assert "backwards" in check_row(store, peer, shard)["reason"]


def test_a_receipt_without_samples_is_rejected(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    payload = receipt(shard, start, samples=[])
    assert submit(store, book, Ledger(store, history), peer, payload) == "rejected"


def test_a_sample_must_give_every_sequences_loss(store, run, history, book):
    """Once a sample held the losses of a batch's first sequences: a node could compute
    just those. Now it holds every sequence's, and the verifier picks among them."""
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    first_only = [{"step": STEP, "batch": 0, "losses": [5.5] * (MICRO_BATCH - 1)}]
    payload = receipt(shard, start, samples=first_only)
    assert submit(store, book, Ledger(store, history), peer, payload) == "rejected"
    assert "every sequence of its batch (4)" in check_row(store, peer, shard)["reason"]


def test_a_loss_sum_that_its_samples_do_not_add_up_to_is_rejected(store, run, history, book):
    the_ledger = Ledger(store, history)
    batches = CAPACITY // MICRO_BATCH
    every_batch = [
        {"step": STEP, "batch": b, "losses": [5.0 + 0.1 * i for i in range(MICRO_BATCH)]}
        for b in range(batches)
    ]
    total = sum(sum(s["losses"]) for s in every_batch)
    peer = Peer(store, run, history)
    start = time.time()
    peer.publish_progress(start, start + 10)
    honest = receipt(peer.lease(book), start, samples=every_batch)
    honest = honest.model_copy(update={"loss_sum": total + 1e-4})  # float sums differ a bit
    assert submit(store, book, the_ledger, peer, honest) == "verified"
    shard = peer.lease(book)
    lower = receipt(shard, start, samples=every_batch).model_copy(update={"loss_sum": total - 3})
    assert submit(store, book, the_ledger, peer, lower) == "rejected"
    assert "add up to" in check_row(store, peer, shard)["reason"]


def test_no_dht_evidence_is_unverified_not_credited_not_flagged(store, run, history, book):
    peer = Peer(store, run, history)
    shard = peer.lease(book)
    start = time.time()
    # Records exist, but from long before the shard: no evidence for this span.
    peer.publish_progress(start - 600, start - 500)
    the_ledger = Ledger(store, history)
    assert submit(store, book, the_ledger, peer, receipt(shard, start)) == "pending"
    assert the_ledger.recheck_waiting(run, now=start + 30) == 1
    assert check_row(store, peer, shard)["status"] == "unverified"
    assert store.get_peer(run.id, peer.session.peer_id)["flagged"] is None
    (entry,) = ledger_views.leaderboard_view(store, run)
    assert entry["verified_tokens"] == 0 and entry["num_unverified"] == 1


def test_dht_evidence_matches_a_peer_by_its_progress_key_only(history):
    history.add("r", ProgressObservation(100.0, subkey_hex("ab" * 8), "QmA", 1, 0, 5.0))
    history.add("r", ProgressObservation(100.0, subkey_hex("cd" * 8), "QmB", 1, 0, 9.0))
    assert [o.dht_peer_id for o in history.between("r", 0, 200, progress_key="ab" * 8)] == ["QmA"]
    # With a key, a record that merely names the peer's id is not its evidence.
    assert history.between("r", 0, 200, progress_key="ef" * 8, dht_peer_id="QmA") == []
    assert len(history.between("r", 0, 200, dht_peer_id="QmB")) == 1
    assert history.between("r", 150, 200, progress_key="ab" * 8) == []


# credit


def test_leaderboard_ranks_by_verified_compute_and_a_banned_peer_gets_nothing(
    store, run, history, book
):
    the_ledger = Ledger(store, history)
    big, small, cheat, banned = (
        Peer(store, run, history, name=n) for n in ("big", "small", "cheat", "banned")
    )
    start = time.time()
    for peer, shards in ((big, 3), (small, 1), (banned, 4)):
        for _ in range(shards):
            shard = peer.lease(book)
            peer.publish_progress(start, start + 10)
            assert submit(store, book, the_ledger, peer, receipt(shard, start)) == "verified"
    shard = cheat.lease(book)
    cheat.publish_progress(start, start + 10)
    submit(store, book, the_ledger, cheat, receipt(shard, start, num_sequences=10 * CAPACITY))
    store.ban(run.id, banned.session.peer_id, "test ban", time.time())

    board = ledger_views.leaderboard_view(store, run)
    assert [e["name"] for e in board[:2]] == ["big", "small"]
    by_name = {e["name"]: e for e in board}
    assert by_name["big"]["verified_share"] == pytest.approx(0.75)
    assert by_name["small"]["verified_share"] == pytest.approx(0.25)
    assert by_name["banned"]["verified_tokens"] == 0 and by_name["banned"]["banned"]
    assert by_name["banned"]["verified_share"] == 0.0
    assert by_name["banned"]["num_tokens"] == 4 * CAPACITY * SEQ_LEN
    assert by_name["cheat"]["flagged"] and by_name["cheat"]["verified_share"] == 0.0
    assert [e["rank"] for e in board] == [1, 2, 3, 4]
    assert ledger_views.verified_tokens(store, run.id, banned.session.peer_id) == 0
    assert (
        ledger_views.verified_tokens(store, run.id, big.session.peer_id) == 3 * CAPACITY * SEQ_LEN
    )

    view = ledger_views.ledger_view(store, run)
    statuses = sorted(r["status"] for r in view["receipts"])
    assert statuses == ["rejected"] + ["verified"] * 8
    assert all(r["num_samples"] == 1 for r in view["receipts"])
    json.dumps(view)  # the API can serve it


def test_verify_section_defaults_and_checks():
    base = ledger_spec("v", None)
    spec = parse_spec(base)
    assert spec.verify.spot_check_fraction == 0.1 and spec.verify.checkpoint_every_s == 60.0
    for bad, key in (
        ("spot_check_fraction = 1.5", "spot_check_fraction"),
        ("spot_check_sequences = 9", "spot_check_sequences"),
        ("loss_tolerance = 0", "loss_tolerance"),
        ("spread_tolerance = 11", "spread_tolerance"),
        ("checkpoint_every_s = 0.1", "checkpoint_every_s"),
        ("spot_checks = 1", "spot_checks"),
    ):
        with pytest.raises(SpecError, match=key):
            parse_spec(base + "[verify]\n" + bad + "\n")
