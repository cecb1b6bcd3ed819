"""Spot checks on a real store: the verifier recomputes claimed losses (the ledger's check (c)).

Receipts go through the same LeaseBook and Ledger calls the gRPC handler makes;
the DHT's evidence is a ProgressHistory filled by the test; spot checks use
checkpoints and private snapshots the test writes. No process, no network, no sleep.
"""

import random
import time

import numpy as np
import torch

from crowdtrain.coordinator.ledger import views as ledger_views
from crowdtrain.coordinator.ledger.ledger import Ledger
from crowdtrain.coordinator.ledger.verifier import SpotChecker, Verifier
from crowdtrain.coordinator.swarm.checkpoints import CHECKPOINTS_DIR
from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint
from crowdtrain.node.data import LeasedShard, ShardStream
from crowdtrain.protocol.messages import ReceiptPayload
from crowdtrain.protocol.shards import batch_windows, read_shard, sequence_order
from crowdtrain.protocol.snapshots import snapshot_name
from tests.coordinator.ledger_support import (
    MICRO_BATCH,
    SEQ_LEN,
    STEP,
    Peer,
    check_row,
    honest_losses,
    publish_run,
    receipt,
    submit,
    write_checkpoint,
)
from tests.specs import TINY_DILOCO


def model_of_no_step(run):
    """Parameters far from any checkpoint (untrained models' losses are all alike): the
    losses they give stand for made-up ones."""
    torch.manual_seed(99)
    model = GPT(GPTConfig.from_spec(run.spec.model)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(6.0)
    return model


def spot_checked(
    store, spot_run, history, book, losses_of, name="laptop", peer=None, sha256_of=None
):
    """Submit a receipt whose sample (step STEP, batch 2) claims ``losses_of(model)``, from
    a new peer ``name`` or from ``peer``; with ``sha256_of``, the sample names the hash of
    its parameters, ``sha256_of(the checkpoint's)``, and is the receipt's only one."""
    model = write_checkpoint(store, spot_run, STEP)
    peer = peer or Peer(store, spot_run, history, name=name)
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    claimed = losses_of(honest_losses(spot_run, shard, 2, model))
    samples = [
        {"step": STEP - 1, "batch": 0, "losses": [9.0] * MICRO_BATCH},  # no checkpoint of it
        {"step": STEP, "batch": 2, "losses": claimed},
    ]
    if sha256_of is not None:
        samples = [{**samples[1], "params_sha256": sha256_of(params_sha256(model.state_dict()))}]
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
    (entry,) = ledger_views.leaderboard_view(store, spot_run)
    assert entry["verified_tokens"] == 0
    # One failed spot check is not credited but flags nobody: an honest node that held
    # other parameters at one step (a partial round) fails one too. The second flags.
    assert store.get_peer(spot_run.id, peer.session.peer_id)["flagged"] is None
    _, again = spot_checked(store, spot_run, history, book, one_off, peer=peer)
    assert (again["spot"], again["status"]) == ("failed", "rejected")
    # The reopened shard is leased to others first; this peer got another.
    assert again["shard_id"] != row["shard_id"]
    assert "spot check" in store.get_peer(spot_run.id, peer.session.peer_id)["flagged"]


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
    elsewhere = model_of_no_step(spot_run)
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


def test_a_spot_check_waits_for_a_checkpoint_then_is_not_credited(store, spot_run, history, book):
    """A receipt picked for a spot check that nothing can recompute is never credited
    (once it was verified unchecked: a node claiming steps no checkpoint would hold got
    full credit), nor is its peer flagged."""
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
    assert (row["spot"], row["status"]) == ("skipped", "unverified")
    assert "no checkpoint of its steps (3..3)" in row["reason"]
    (entry,) = ledger_views.leaderboard_view(store, spot_run)
    assert entry["verified_tokens"] == 0 and entry["flagged"] is None


def write_snapshot(folder, run, step, seed):
    """The step follower's private snapshot of ``step`` (a model seeded ``seed``)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_spec(run.spec.model)).eval()
    (folder / run.id).mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    metadata = {"step": str(step), "params_sha256": params_sha256(state)}
    save_checkpoint(folder / run.id / snapshot_name(step), state, metadata)
    return model


def test_a_node_right_only_at_publicly_checkpointed_steps_is_not_credited(
    store, spot_run, history, book, tmp_path
):
    """Checkpoints are public: a node can compute the losses of the checkpointed steps'
    batches and make up the others. The verifier checks a step the keeper kept privately
    first: made up there and right at the public step, the receipt is not credited (not
    flagged: an honest node whose round there was partial looks alike); right at both,
    it passes on the private step. With only the public checkpoints (no snapshots), the
    made-up receipt passes."""
    public = write_checkpoint(store, spot_run, STEP, seed=11)
    snapshots = tmp_path / "snapshots"
    private = write_snapshot(snapshots, spot_run, STEP + 1, seed=12)
    elsewhere = model_of_no_step(spot_run)
    outcomes = {}
    for name, at_private, snapshots_of in (
        ("foresees", elsewhere, lambda run_id: snapshots / run_id),
        ("honest", private, lambda run_id: snapshots / run_id),
        ("foresees-unseen", elsewhere, None),
    ):
        peer = Peer(store, spot_run, history, name=name)
        shard = peer.lease(book)
        start = time.time()
        peer.publish_progress(start, start + 10, epochs=(STEP, STEP + 1))
        samples = [
            {"step": STEP, "batch": 0, "losses": honest_losses(spot_run, shard, 0, public)},
            {"step": STEP + 1, "batch": 1, "losses": honest_losses(spot_run, shard, 1, at_private)},
        ]
        payload = receipt(shard, start, samples=samples)
        assert submit(store, book, Ledger(store, history), peer, payload) == "pending"
        checker = SpotChecker(
            store, store.data_dir / CHECKPOINTS_DIR, random.Random(0), snapshots_of=snapshots_of
        )
        assert Verifier(store, None, checker).run_spot_checks(time.time()) == 1
        row = check_row(store, peer, shard)
        flagged = store.get_peer(spot_run.id, peer.session.peer_id)["flagged"]
        outcomes[name] = (row["spot"], row["status"], flagged)
        if name == "foresees":
            assert "where the node could not foresee it" in row["reason"], row["reason"]
            assert "step 4, batch 1" in row["reason"], row["reason"]
        if name == "honest":
            assert "step 4, batch 1" in row["spot_reason"], row["spot_reason"]
    assert outcomes == {
        "foresees": ("failed", "unverified", None),
        "honest": ("passed", "verified", None),
        "foresees-unseen": ("passed", "verified", None),
    }, outcomes


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


def test_a_peer_is_spot_checked_at_every_receipt_until_its_checks_pass(
    store, prepared, tmp_path, history, book
):
    """Probation: at a spot_check_fraction of 0.01, a new peer's receipts are all checked
    until probation_checks (2) passed; then at the fraction; a failed check puts it back
    on probation. A free rider is thus checked from its first receipt."""
    run = publish_run(store, prepared, tmp_path, "probation-run", 0.01, probation_checks=2)
    ledger = Ledger(store, history, random.Random(0))
    peer = Peer(store, run, history, name="newcomer")
    assert ledger.spot_check_fraction(run, peer.session.peer_id) == 1.0
    for _ in range(2):  # spot_checked asserts the receipt was queued for its check
        _, row = spot_checked(store, run, history, book, lambda honest: honest, peer=peer)
        assert row["spot"] == "passed", row["spot_reason"]
    assert ledger.spot_check_fraction(run, peer.session.peer_id) == 0.01
    shard = peer.lease(book)
    start = time.time()
    peer.publish_progress(start, start + 10)
    samples = [{"step": STEP, "batch": 0, "losses": [4.0] * MICRO_BATCH}]
    assert submit(store, book, ledger, peer, receipt(shard, start, samples=samples)) == "verified"
    assert check_row(store, peer, shard)["spot"] == "not selected"

    class Picked(random.Random):  # this receipt is picked for its spot check
        def random(self) -> float:
            return 0.0

    shard = peer.lease(book)
    peer.publish_progress(start, start + 10)
    samples = [{"step": STEP, "batch": 2, "losses": [9.0] * MICRO_BATCH}]
    picked = Ledger(store, history, Picked())
    assert submit(store, book, picked, peer, receipt(shard, start, samples=samples)) == "pending"
    checker = SpotChecker(store, store.data_dir / CHECKPOINTS_DIR, random.Random(0))
    assert Verifier(store, None, checker).run_spot_checks(time.time()) == 1
    assert check_row(store, peer, shard)["spot"] == "failed"
    assert ledger.spot_check_fraction(run, peer.session.peer_id) == 1.0


def test_diloco_samples_must_match_within_the_exact_tolerance(
    store, prepared, tmp_path, history, book, spot_run
):
    """A DiLoCo sample is computed at parameters the keeper holds bit for bit: a shift of
    0.1 nats on every loss (losses from another round's parameters, say) passes as drift
    in a sync run and fails at diloco_tolerance (0.05)."""
    diloco = publish_run(store, prepared, tmp_path, "diloco-spot", 1.0, optimizer=TINY_DILOCO)

    def shifted(honest):
        return [x + 0.1 for x in honest]

    _, row = spot_checked(store, spot_run, history, book, shifted, name="sync-node")
    assert (row["spot"], row["status"]) == ("passed", "verified"), row["spot_reason"]
    _, row = spot_checked(store, diloco, history, book, shifted, name="diloco-node")
    assert (row["spot"], row["status"]) == ("failed", "rejected"), row["spot_reason"]
    assert "(tolerance 0.05)" in row["reason"], row["reason"]
    _, row = spot_checked(store, diloco, history, book, lambda honest: honest, name="honest")
    assert (row["spot"], row["status"]) == ("passed", "verified"), row["spot_reason"]


def test_a_diloco_sample_of_other_parameters_than_the_keepers_is_not_checked_against_them(
    store, prepared, tmp_path, history, book
):
    """A DiLoCo node whose round met in a group without the keeper's follower holds other
    global parameters than the keeper's checkpoint of that round; its sample says so by
    their hash: not credited, not failed (its node not flagged). Naming the keeper's hash
    with losses of other parameters fails."""
    diloco = publish_run(store, prepared, tmp_path, "diloco-hash", 1.0, optimizer=TINY_DILOCO)

    def elsewhere(honest):
        return [x + 1.0 for x in honest]

    peer, row = spot_checked(
        store, diloco, history, book, elsewhere, name="split", sha256_of=lambda kept: "0" * 64
    )
    assert (row["spot"], row["status"]) == ("skipped", "unverified"), row["spot_reason"]
    assert "other global parameters" in row["reason"], row["reason"]
    assert store.get_peer(diloco.id, peer.session.peer_id)["flagged"] is None
    _, row = spot_checked(
        store, diloco, history, book, elsewhere, name="liar", sha256_of=lambda kept: kept
    )
    assert (row["spot"], row["status"]) == ("failed", "rejected"), row["spot_reason"]
    _, row = spot_checked(
        store, diloco, history, book, lambda h: h, name="kept", sha256_of=lambda kept: kept
    )
    assert (row["spot"], row["status"]) == ("passed", "verified"), row["spot_reason"]
