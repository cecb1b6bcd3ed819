"""The contribution ledger on a real store: each receipt checked three ways, credit and shares.

Receipts go through the same LeaseBook and Ledger calls the gRPC handler makes;
the DHT's evidence is a ProgressHistory filled by the test; spot checks use a
checkpoint the test writes. No process, no network, no sleep.
"""

import json
import random
import time

import numpy as np
import pytest
import torch

from crowdtrain.coordinator.ledger import checks
from crowdtrain.coordinator.ledger import views as ledger_views
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.ledger.verifier import SpotChecker, Verifier
from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.runs.publish import prepare_publication, publish
from crowdtrain.coordinator.runs.views import peers_view
from crowdtrain.coordinator.swarm.checkpoints import CHECKPOINTS_DIR
from crowdtrain.coordinator.swarm.dht import ProgressHistory, ProgressObservation, subkey_hex
from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint, sequence_losses
from crowdtrain.node.data import LeasedShard, ShardStream
from crowdtrain.protocol.devices import device_peak, peak_flops
from crowdtrain.protocol.errors import SpecError
from crowdtrain.protocol.messages import ReceiptPayload
from crowdtrain.protocol.runspec import parse_spec
from crowdtrain.protocol.shards import batch_windows, read_shard, sequence_order
from tests.coordinator.registration import COORDINATOR_KEY, join_peer
from tests.specs import small_spec

SEQ_LEN, MICRO_BATCH = 32, 4
# The prepared shards hold 1024 tokens: 31 windows, 7 micro-batches of 4.
CAPACITY = 28
STEP = 3


def _spec(run_id: str, fraction: float | None, **more: object) -> str:
    """The ledger tests' run; ``fraction`` None leaves [verify] out; ``more`` of it."""
    verify = {"spot_check_fraction": fraction, "checkpoint_every_s": 5, **more}
    return small_spec(
        run={"id": run_id, "seed": 5}, verify=verify if fraction is not None else None
    )


def _publish(store, prepared, tmp_path, run_id, fraction, **verify):
    spec_path = tmp_path / f"{run_id}.toml"
    spec_path.write_text(_spec(run_id, fraction, **verify), encoding="utf-8")
    return get_run(
        store, publish(store, prepare_publication(spec_path, prepared), COORDINATOR_KEY).run_id
    )


@pytest.fixture
def run(store, prepared, tmp_path):
    return _publish(store, prepared, tmp_path, "ledger-run", 0.0)


@pytest.fixture
def spot_run(store, prepared, tmp_path):
    return _publish(store, prepared, tmp_path, "spot-run", 1.0)


@pytest.fixture
def pick_run(store, prepared, tmp_path):
    """Spot checks of 2 of a micro-batch's 4 sequences."""
    return _publish(store, prepared, tmp_path, "pick-run", 1.0, spot_check_sequences=2)


class Peer:
    """A registered peer with its swarm identity, a lease and its DHT evidence."""

    def __init__(self, store, run, history, name="laptop", rate=50.0):
        self.store, self.run, self.history = store, run, history
        self.session = join_peer(store, run.id, name=name)
        self.key = f"{abs(hash(name)):040x}"[:40]
        store.set_swarm_ids(run.id, self.session.peer_id, f"Qm{name}", self.key)
        self.rate = rate

    def lease(self, book):
        (granted,) = book.grant(self.run, self.session, 1)
        return granted.shard_id

    def publish_progress(self, start, end, epochs=(STEP,), rate=None):
        """Progress records seen every 2 s over [start, end], going through ``epochs``."""
        times = np.arange(start, end + 1e-9, 2.0)
        for i, t in enumerate(times):
            self.history.add(
                self.run.id,
                ProgressObservation(
                    seen_at=float(t),
                    progress_key=subkey_hex(self.key),
                    dht_peer_id=f"Qm{self.session.peer_id}",
                    epoch=epochs[min(len(epochs) - 1, i * len(epochs) // len(times))],
                    samples_accumulated=4 * i,
                    samples_per_second=self.rate if rate is None else rate,
                ),
            )


def receipt(shard_id, started, duration=10.0, num_sequences=CAPACITY, samples=None):
    if samples is None:
        samples = [{"step": STEP, "batch": 0, "losses": [5.5] * MICRO_BATCH}]
    return ReceiptPayload(
        shard_id=shard_id,
        epoch=0,
        num_sequences=num_sequences,
        num_tokens=num_sequences * SEQ_LEN,
        loss_sum=5.5 * num_sequences,
        started=started,
        finished=started + duration,
        micro_batch_size=MICRO_BATCH,
        samples=samples,
    )


@pytest.fixture
def history():
    return ProgressHistory()


@pytest.fixture
def book(store):
    return LeaseBook(store)


def submit(store, book, the_ledger, peer, payload, sent_at=None, received_at=None):
    """Complete the lease and assess the receipt, as ReportShard does."""
    received_at = payload.finished + 0.5 if received_at is None else received_at
    book.complete(peer.run, peer.session, payload)
    return the_ledger.assess(
        peer.run,
        peer.session,
        payload,
        sent_at=received_at if sent_at is None else sent_at,
        received_at=received_at,
    )


def check_row(store, peer, shard_id):
    return store.get_receipt_check(peer.run.id, peer.session.peer_id, shard_id, 0)


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


# (c) spot checks


def honest_losses(run, shard_id, batch, model, n=MICRO_BATCH):
    entry = next(s for s in run.manifest.train_shards if s.id == shard_id)
    tokens = read_shard(run.data_path / entry.file)
    order = sequence_order(run.spec.run.seed, 0, shard_id, len(tokens), SEQ_LEN, MICRO_BATCH)
    inputs = torch.from_numpy(batch_windows(tokens, order, batch, MICRO_BATCH, SEQ_LEN))[:n]
    with torch.no_grad():
        logits, _ = model(inputs[:, :-1])
        return sequence_losses(logits, inputs[:, 1:]).tolist()


def write_checkpoint(store, run, step, seed=11, created_at=None):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_spec(run.spec.model)).eval()
    folder = store.data_dir / CHECKPOINTS_DIR / run.id
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}.safetensors"
    file_sha = save_checkpoint(folder / name, model.state_dict(), {"step": str(step)})
    store.insert_checkpoint(
        {
            "run_id": run.id,
            "step": step,
            "sha256": params_sha256(model.state_dict()),
            "file": name,
            "file_sha256": file_sha,
            "num_bytes": (folder / name).stat().st_size,
            "spec_hash": run.spec.hash,
            "created_at": time.time() if created_at is None else created_at,
            "cpu_s": 0.1,
        }
    )
    return model


def spot_checked(store, spot_run, history, book, losses_of, name="laptop"):
    """Submit a receipt whose sample (step STEP, batch 2) claims ``losses_of(model)``."""
    model = write_checkpoint(store, spot_run, STEP)
    peer = Peer(store, spot_run, history, name=name)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    claimed = losses_of(honest_losses(spot_run, shard, 2, model))
    samples = [
        {"step": STEP - 1, "batch": 0, "losses": [9.0] * MICRO_BATCH},  # no checkpoint of it
        {"step": STEP, "batch": 2, "losses": claimed},
    ]
    payload = receipt(shard, start, samples=samples)
    assert submit(store, book, Ledger(store, history), peer, payload) == "pending"
    assert check_row(store, peer, shard)["spot"] == "queued"
    verifier = Verifier(
        store, None, SpotChecker(store, store.data_dir / CHECKPOINTS_DIR, random.Random(0))
    )
    assert verifier.run_spot_checks(time.time()) == 1
    return peer, check_row(store, peer, shard)


def test_a_spot_check_passes_when_the_claimed_losses_are_recomputed(store, spot_run, history, book):
    peer, row = spot_checked(store, spot_run, history, book, lambda honest: honest)
    assert (row["spot"], row["status"]) == ("passed", "verified"), row["spot_reason"]
    assert row["spot_cpu_s"] > 0
    assert store.get_peer(spot_run.id, peer.session.peer_id)["flagged"] is None
    costs = ledger_views.costs_view(store, spot_run)
    assert costs["num_spot_checks"] == 1 and costs["cpu_s_per_verified_receipt"] > 0


def test_a_spot_check_fails_when_a_claimed_loss_is_off(store, spot_run, history, book):
    def one_off(honest):
        return [honest[0], honest[1] + 1.5, *honest[2:]]

    peer, row = spot_checked(store, spot_run, history, book, one_off)
    assert (row["spot"], row["status"]) == ("failed", "rejected")
    assert "sequence 1 of step 3, batch 2" in row["reason"]
    assert "spot check" in store.get_peer(spot_run.id, peer.session.peer_id)["flagged"]
    (entry,) = ledger_views.leaderboard_view(store, spot_run)
    assert entry["verified_tokens"] == 0


def test_a_drift_moves_every_loss_alike_guesses_do_not(store, spot_run, history, book):
    """A node whose parameters drifted from the checkpoint's is off by about the same for
    every sequence: passed. Guesses within the loss tolerance, each off its own way: not."""
    _, row = spot_checked(store, spot_run, history, book, lambda h: [x + 0.3 for x in h])
    assert (row["spot"], row["status"]) == ("passed", "verified"), row["spot_reason"]

    def guessed(honest):
        return [honest[0], honest[1], honest[2] + 0.3, honest[3] - 0.2]

    _, row = spot_checked(store, spot_run, history, book, guessed, name="guesser")
    assert (row["spot"], row["status"]) == ("failed", "rejected"), row
    assert "+0.300, -0.200" in row["reason"] and "apart from their mean" in row["reason"]


def test_a_spot_check_picks_the_sequences_after_the_receipt_arrived(store, pick_run, history, book):
    """Right losses for some sequences of a batch and made-up ones for the rest (what a
    node that computes only the sequences it expects to be checked sends) fail whenever
    the verifier's pick includes a made-up one; which it picks changes from check to
    check, so over a few receipts such a node is caught."""
    model = write_checkpoint(store, pick_run, STEP)
    outcomes, picks = [], set()
    for seed in range(8):
        checker = SpotChecker(store, store.data_dir / CHECKPOINTS_DIR, random.Random(seed))
        peer = Peer(store, pick_run, history, name=f"half-{seed}")
        shard = peer.lease(book)
        start = time.time()
        peer.publish_progress(start, start + 10)
        honest = honest_losses(pick_run, shard, 2, model)
        made_up = [*honest[:2], 1.0, 1.0]  # sequences 2 and 3 are made up
        payload = receipt(shard, start, samples=[{"step": STEP, "batch": 2, "losses": made_up}])
        assert submit(store, book, Ledger(store, history), peer, payload) == "pending"
        assert Verifier(store, None, checker).run_spot_checks(time.time()) == 1
        row = check_row(store, peer, shard)
        text = row["spot_reason"] if row["spot"] == "passed" else row["reason"]
        picks.add(text)
        guessed = "sequence 2 " in text or "sequence 3 " in text
        assert row["spot"] == ("failed" if guessed else "passed"), row
        outcomes.append(row["spot"])
    assert len(picks) > 2 and "failed" in outcomes, picks


def test_a_sample_of_one_step_off_is_forgiven_when_another_steps_matches(
    store, spot_run, history, book
):
    """A sync node whose round at one step was partial holds other parameters than the
    checkpoint's there, and the swarm's again a step later (it failed CI once as a
    rejected honest node): the verifier checks a sample of each of up to three
    checkpointed steps and passes the receipt when one matches; when none does, it fails."""
    write_checkpoint(store, spot_run, STEP, seed=11)
    at_next = write_checkpoint(store, spot_run, STEP + 1, seed=12)
    torch.manual_seed(99)
    elsewhere = GPT(GPTConfig.from_spec(spot_run.spec.model)).eval()  # parameters of no step
    with torch.no_grad():
        for param in elsewhere.parameters():
            param.mul_(6.0)  # far from any checkpoint: untrained models' losses are all alike
    for name, next_model, expected in (
        ("partial", at_next, "passed"),
        ("off", elsewhere, "failed"),
    ):
        peer = Peer(store, spot_run, history, name=name)
        shard = peer.lease(book)
        start = time.time()
        peer.publish_progress(start, start + 10, epochs=(STEP, STEP + 1))
        samples = [
            {"step": STEP, "batch": 0, "losses": honest_losses(spot_run, shard, 0, elsewhere)},
            {"step": STEP + 1, "batch": 1, "losses": honest_losses(spot_run, shard, 1, next_model)},
        ]
        payload = receipt(shard, start, samples=samples)
        assert submit(store, book, Ledger(store, history), peer, payload) == "pending"
        checker = SpotChecker(store, store.data_dir / CHECKPOINTS_DIR, random.Random(0))
        assert Verifier(store, None, checker).run_spot_checks(time.time()) == 1
        row = check_row(store, peer, shard)
        assert row["spot"] == expected, row
        if expected == "passed":
            assert "step 4, batch 1" in row["spot_reason"], row["spot_reason"]
        else:
            assert "1 other steps did not match either" in row["reason"], row["reason"]


def test_a_spot_check_waits_for_a_checkpoint_then_is_skipped(store, spot_run, history, book):
    peer = Peer(store, spot_run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    assert submit(store, book, Ledger(store, history), peer, receipt(shard, start)) == "pending"
    verifier = Verifier(store, None, SpotChecker(store, store.data_dir / CHECKPOINTS_DIR))
    assert verifier.run_spot_checks(time.time()) == 0  # no checkpoint yet: it waits
    # A checkpoint taken after the receipt arrived, of a later step: none of its steps' will come.
    write_checkpoint(store, spot_run, STEP + 5, created_at=time.time() + 60)
    assert verifier.run_spot_checks(time.time()) == 1
    row = check_row(store, peer, shard)
    assert (row["spot"], row["status"]) == ("skipped", "verified")
    assert "no checkpoint" in row["spot_reason"]


def test_a_spot_check_fails_a_sample_from_a_step_the_swarm_had_not_reached(
    store, spot_run, history, book
):
    peer = Peer(store, spot_run, history)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    future = [
        {"step": STEP, "batch": 0, "losses": [5.0] * MICRO_BATCH},
        {"step": 90, "batch": 1, "losses": [5.0] * MICRO_BATCH},
    ]
    payload = receipt(shard, start, samples=future)
    assert submit(store, book, Ledger(store, history), peer, payload) == "pending"
    write_checkpoint(store, spot_run, STEP + 2, created_at=time.time() + 60)
    verifier = Verifier(store, None, SpotChecker(store, store.data_dir / CHECKPOINTS_DIR))
    assert verifier.run_spot_checks(time.time()) == 1
    row = check_row(store, peer, shard)
    assert (row["spot"], row["status"]) == ("failed", "rejected")
    assert "step 90" in row["reason"] and f"step {STEP + 2}" in row["reason"]


def test_the_verifier_cuts_the_same_batches_as_the_node(spot_run):
    """node/data.py and the verifier share protocol/shards.py's order: the node's third
    micro-batch of a shard is the one the verifier rebuilds from the receipt's sample."""
    entry = spot_run.manifest.train_shards[3]
    stream = ShardStream(spot_run.spec.run.seed, SEQ_LEN, MICRO_BATCH)
    stream.offer(LeasedShard(entry.id, 0, spot_run.data_path / entry.file, entry))
    batches = [stream.next_batch() for _ in range(3)]
    batch, progress = batches[-1]
    assert progress.batch == 2
    tokens = read_shard(spot_run.data_path / entry.file)
    order = sequence_order(spot_run.spec.run.seed, 0, entry.id, len(tokens), SEQ_LEN, MICRO_BATCH)
    assert np.array_equal(batch, batch_windows(tokens, order, 2, MICRO_BATCH, SEQ_LEN))
    # The node records the first batch at each step as a sample, with every sequence's loss.
    assert progress.wants_sample(STEP)
    progress.add_sample(STEP, [1.0 + 1e-7 * i for i in range(MICRO_BATCH)])
    assert not progress.wants_sample(STEP) and progress.wants_sample(STEP + 1)
    sent = progress.receipt().model_dump()  # as the node signs it
    assert sent["samples"] == [{"step": STEP, "batch": 2, "losses": [1.0] * MICRO_BATCH}]
    assert sent["micro_batch_size"] == MICRO_BATCH
    ReceiptPayload.model_validate({**sent, "finished": sent["started"] + 1})


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
    base = _spec("v", None)
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
