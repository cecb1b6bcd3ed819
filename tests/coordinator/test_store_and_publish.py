import dataclasses
import shutil

import pytest

from crowdtrain.coordinator import records
from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from crowdtrain.coordinator.records import SessionError, UnknownRunError, get_run
from crowdtrain.coordinator.runs import leases, peers
from crowdtrain.coordinator.runs.leases import LeaseBook
from crowdtrain.coordinator.runs.peers import PeerConfig
from crowdtrain.coordinator.runs.publish import (
    check_spec_against_data,
    prepare_publication,
    publish,
)
from crowdtrain.coordinator.runs.views import peers_view, run_view
from crowdtrain.coordinator.store import Store, StoreError
from crowdtrain.protocol.errors import AccessError, ShardError, SpecError
from crowdtrain.protocol.identity import Identity
from crowdtrain.protocol.messages import (
    Evaluation,
    HeartbeatPayload,
    PeerReport,
    ReceiptPayload,
)
from crowdtrain.protocol.runspec import load_spec
from tests.coordinator.registration import COORDINATOR_KEY
from tests.coordinator.registration import join_peer as _join
from tests.specs import small_spec
from tests.swarm_keys import SwarmKeys

CONFIG = PeerConfig()
LEASE_S = 600.0  # the default [data] lease_s; the spec does not set it


def _write_spec(path, vocab_size=256, seq_len=32, d_model=16):
    spec = small_spec(
        run={"id": "unit-run", "seed": None, "description": "a run for unit tests"},
        model={"vocab_size": vocab_size, "seq_len": seq_len, "d_model": d_model},
    )
    path.write_text(spec, encoding="utf-8")
    return path


@pytest.fixture
def data(prepared, tmp_path):
    """A private copy of the data folder, free to tamper with."""
    return shutil.copytree(prepared, tmp_path / "data")


@pytest.fixture
def spec_path(tmp_path):
    return _write_spec(tmp_path / "run.toml")


@pytest.fixture
def book(store):
    return LeaseBook(store)


@pytest.fixture
def run(store, spec_path, data):
    result = publish(store, prepare_publication(spec_path, data), COORDINATOR_KEY)
    assert not result.already_published
    return get_run(store, result.run_id)


def _beat(session_key="session-aaaa", num_tokens=0, evaluation=None, step=0):
    return HeartbeatPayload(
        session_key=session_key,
        num_tokens=num_tokens,
        num_sequences=num_tokens // 32,
        tokens_per_s=100.0,
        loss=3.0,
        step=step,
        evaluations=[evaluation] if evaluation is not None else [],
    )


def _receipt(shard_id, epoch=0, started=1000.0, finished=1010.0):
    return ReceiptPayload(
        shard_id=shard_id,
        epoch=epoch,
        num_sequences=31,
        num_tokens=992,
        loss_sum=90.0,
        started=started,
        finished=finished,
    )


# publishing


def test_publish_stores_the_run(store, spec_path, data):
    publication = prepare_publication(spec_path, data)
    result = publish(store, publication, COORDINATOR_KEY)
    assert result.run_id == "unit-run"
    assert result.num_train_shards == 20
    assert result.spec_hash == load_spec(spec_path).hash
    assert not result.already_published

    run = get_run(store, "unit-run")
    assert run.id == "unit-run"
    assert run.spec == load_spec(spec_path)
    assert run.manifest == publication.manifest
    assert run.data_path == data.resolve()
    assert run.row["spec_toml"] == spec_path.read_text(encoding="utf-8")

    view = run_view(store, "unit-run")
    assert view["id"] == "unit-run"
    assert view["description"] == "a run for unit tests"
    assert (view["step"], view["num_tokens"], view["num_peers"]) == (0, 0, 0)
    assert view["val_loss"] is None and view["val_step"] is None
    assert view["shards"] == {"total": 20, "pending": 20, "leased": 0, "done": 0}
    assert view["spec_hash"] == result.spec_hash
    assert view["spec"]["model"]["seq_len"] == 32


def test_unknown_run_lists_the_runs_there(run, store):
    with pytest.raises(UnknownRunError, match="no run 'other'.*runs here: unit-run"):
        run_view(store, "other")


def test_publishing_again_is_a_no_op(run, store, spec_path, data):
    before = store.get_run("unit-run")
    again = publish(store, prepare_publication(spec_path, data), COORDINATOR_KEY)
    assert again.already_published
    assert again.spec_hash == before["spec_hash"]
    assert store.get_run("unit-run") == before
    assert len(store.list_runs()) == 1


def test_reformatted_spec_counts_as_the_same_run(run, store, spec_path, data, tmp_path):
    commented = tmp_path / "commented.toml"
    commented.write_text("# same values, new comments\n" + spec_path.read_text(), encoding="utf-8")
    assert publish(store, prepare_publication(commented, data), COORDINATOR_KEY).already_published


def test_changed_spec_with_the_same_id_is_refused(run, store, data, tmp_path):
    before = store.get_run("unit-run")
    changed = _write_spec(tmp_path / "changed.toml", d_model=32)
    with pytest.raises(SpecError) as info:
        publish(store, prepare_publication(changed, data), COORDINATOR_KEY)
    message = str(info.value)
    assert str(changed) in message
    assert "run 'unit-run' is already published" in message
    assert "choose a new [run] id" in message
    assert store.get_run("unit-run") == before
    assert run_view(store, "unit-run")["spec"]["model"]["d_model"] == 16


def test_changed_data_with_the_same_id_is_refused(run, store, spec_path, tmp_path):
    corpus = tmp_path / "other-corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"other text {i}\n" * 200, encoding="utf-8")
    other = tmp_path / "other-data"
    prepare_data(PrepareConfig(sources=(corpus,), out=other, shard_tokens=1024, val_fraction=0.2))
    before = store.get_run("unit-run")
    with pytest.raises(SpecError, match="different spec or data"):
        publish(store, prepare_publication(spec_path, other), COORDINATOR_KEY)
    assert store.get_run("unit-run") == before


def test_spec_with_wrong_vocab_size_is_refused(data, tmp_path):
    spec = _write_spec(tmp_path / "vocab.toml", vocab_size=512)
    with pytest.raises(SpecError, match=r"\[model\] vocab_size must be 256"):
        prepare_publication(spec, data)


def test_data_with_another_vocab_size_is_refused(data, spec_path):
    manifest = prepare_publication(spec_path, data).manifest
    spec = load_spec(spec_path)
    with pytest.raises(SpecError) as info:
        check_spec_against_data(spec, dataclasses.replace(manifest, vocab_size=128), "run.toml")
    assert "[model] vocab_size must be 128 to match the data, got 256" in str(info.value)
    with pytest.raises(SpecError, match=r"\[data\] tokenizer is 'byte'.*prepared with 'bpe'"):
        check_spec_against_data(spec, dataclasses.replace(manifest, tokenizer="bpe"), "run.toml")


def test_seq_len_longer_than_a_shard_is_refused(data, tmp_path):
    spec = _write_spec(tmp_path / "long.toml", seq_len=501)
    with pytest.raises(SpecError) as info:
        prepare_publication(spec, data)
    message = str(info.value)
    assert "[model] seq_len 501 is longer than the shortest shard (501 tokens)" in message
    assert "lower seq_len or prepare larger shards" in message
    assert prepare_publication(_write_spec(tmp_path / "fits.toml", seq_len=500), data)


def test_tampered_shard_is_refused_by_name(data, spec_path):
    shard = data / "train-00003.bin"
    content = bytearray(shard.read_bytes())
    content[-1] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(ShardError) as info:
        prepare_publication(spec_path, data)
    assert "'train-00003'" in str(info.value)
    assert "fails its checksum" in str(info.value)


def test_missing_shard_is_refused_by_name(data, spec_path):
    (data / "val-00000.bin").unlink()
    with pytest.raises(ShardError, match="shard 'val-00000' is missing"):
        prepare_publication(spec_path, data)


def test_run_survives_reopening_the_store(run, store, tmp_path):
    store.close()
    reopened = Store(tmp_path / "coordinator", create=False)
    try:
        assert get_run(reopened, "unit-run").spec == run.spec
        assert run_view(reopened, "unit-run")["shards"]["pending"] == 20
    finally:
        reopened.close()


def test_store_refuses_a_folder_that_is_not_one(tmp_path):
    with pytest.raises(StoreError, match="not a coordinator data folder"):
        Store(tmp_path / "nowhere", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        Store(tmp_path / "file")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "coordinator.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(broken)


# peers


def test_register_lists_the_peer(run, store):
    session = _join(store, run.id, name="gpu-box")
    assert peers.authenticate(store, session.token) == session
    [peer] = peers_view(store, run.id)
    assert (peer["peer_id"], peer["name"], peer["state"]) == (session.peer_id, "gpu-box", "active")
    assert run_view(store, run.id)["num_peers"] == 1


def test_register_for_an_unknown_run_is_refused(run, store):
    with pytest.raises(UnknownRunError):
        _join(store, "no-such-run")
    assert peers_view(store, run.id) == []


def test_heartbeat_counts_tokens_once(run, store):
    session = _join(store, run.id)
    peers.heartbeat(store, session, _beat(num_tokens=1000, step=2))
    assert run_view(store, run.id)["num_tokens"] == 1000

    # The same heartbeat again (a retry) changes nothing.
    peers.heartbeat(store, session, _beat(num_tokens=1000, step=2))
    view = run_view(store, run.id)
    assert view["num_tokens"] == 1000 and view["step"] == 2

    # Counters are cumulative within a node session.
    peers.heartbeat(store, session, _beat(num_tokens=1500, step=3))
    assert run_view(store, run.id)["num_tokens"] == 1500

    # A late, older heartbeat of the same session does not lower the total.
    peers.heartbeat(store, session, _beat(num_tokens=1200, step=3))
    assert run_view(store, run.id)["num_tokens"] == 1500


def test_new_node_session_adds_on_top(run, store):
    session = _join(store, run.id)
    peers.heartbeat(store, session, _beat("session-aaaa", num_tokens=1000))
    peers.heartbeat(store, session, _beat("session-bbbb", num_tokens=300))
    peers.heartbeat(store, session, _beat("session-bbbb", num_tokens=300))
    [peer] = peers_view(store, run.id)
    assert peer["num_tokens"] == 1300
    assert run_view(store, run.id)["num_tokens"] == 1300


def test_tokens_of_two_peers_add_up(run, store):
    first = _join(store, run.id, name="one")
    second = _join(store, run.id, name="two")
    peers.heartbeat(store, first, _beat(num_tokens=1000))
    peers.heartbeat(store, second, _beat(num_tokens=700))
    view = run_view(store, run.id)
    assert view["num_tokens"] == 1700 and view["num_peers"] == 2


def test_interleaved_sessions_of_one_peer_are_not_double_counted(run, store):
    identity = Identity.generate()
    first = _join(store, run.id, identity=identity)
    second = _join(store, run.id, identity=identity)
    for _ in range(2):
        peers.heartbeat(store, first, _beat("session-aaaa", num_tokens=1000))
        peers.heartbeat(store, second, _beat("session-bbbb", num_tokens=500))
    assert run_view(store, run.id)["num_tokens"] == 1500


def test_evaluation_shows_up_as_val_loss(run, store):
    session = _join(store, run.id)
    first = Evaluation(step=5, num_tokens=5000, loss=3.5, bits_per_byte=5.05)
    peers.heartbeat(store, session, _beat(num_tokens=5000, evaluation=first, step=5))
    later = Evaluation(step=10, num_tokens=9000, loss=2.25, bits_per_byte=3.25)
    peers.heartbeat(store, session, _beat(num_tokens=9000, evaluation=later, step=10))
    view = run_view(store, run.id)
    assert view["val_loss"] == 2.25
    assert view["val_bits_per_byte"] == 3.25
    assert view["val_step"] == 10
    assert view["first_val_loss"] == 3.5
    assert view["step"] == 10


def test_a_heartbeat_is_answered_with_the_step_peers_roster_and_credit(run, store, book):
    session = _join(store, run.id)
    keys = SwarmKeys()
    beat = HeartbeatPayload.model_validate(
        {**_beat(num_tokens=1000, step=2).model_dump(), **keys.fields(run.id, session.public_key)}
    )
    answer = peers.take_heartbeat(store, book, session, beat)
    assert (answer.step, answer.num_peers) == (2, 1)
    # no verified work yet: a newcomer's weight
    assert answer.roster == ((keys.dht_peer_id, 1.0 * run.spec.optimizer.target_batch_size),)
    assert (answer.verified_tokens, answer.verified_share) == (0, 0.0)
    assert peers_view(store, run.id)[0]["num_tokens"] == 1000
    with pytest.raises(UnknownRunError):
        peers.take_heartbeat(store, book, dataclasses.replace(session, run_id="gone"), beat)


def test_leave_shows_peer_as_left_and_ends_its_session(run, store, book):
    session = _join(store, run.id)
    peers.leave(store, book, session)
    [peer] = peers_view(store, run.id)
    assert peer["state"] == "left"
    assert run_view(store, run.id)["num_peers"] == 0
    with pytest.raises(SessionError, match="register again"):
        peers.authenticate(store, session.token)


def test_unknown_session_token_is_refused(store):
    with pytest.raises(SessionError):
        peers.authenticate(store, "not-a-token")
    with pytest.raises(SessionError):
        peers.authenticate(store, "")


# leases and receipts


def test_grant_hands_out_distinct_shards(run, store, book):
    first = _join(store, run.id, name="one")
    second = _join(store, run.id, name="two")
    one = book.grant(run, first, max_shards=3)
    two = book.grant(run, second, max_shards=3)
    assert len(one) == len(two) == 3
    assert not {lease.shard_id for lease in one} & {lease.shard_id for lease in two}
    assert all(lease.epoch == 0 and lease.expires_in_s == LEASE_S for lease in one + two)
    assert all(lease.shard_id.startswith("train-") for lease in one + two)
    assert run_view(store, run.id)["shards"] == {
        "total": 20,
        "pending": 14,
        "leased": 6,
        "done": 0,
    }


def test_grant_caps_the_number_of_shards(run, store, book):
    session = _join(store, run.id)
    assert len(book.grant(run, session, max_shards=1000)) == leases.MAX_SHARDS_PER_LEASE
    assert len(book.grant(run, session, max_shards=0)) == 1


def test_receipt_from_a_peer_without_the_lease_is_refused(run, store, book):
    holder = _join(store, run.id, name="holder")
    other = _join(store, run.id, name="other")
    [lease] = book.grant(run, holder, max_shards=1)
    with pytest.raises(leases.ReceiptError, match="was never leased to this peer"):
        book.complete(run, other, _receipt(lease.shard_id))
    assert store.list_receipts(run.id) == []
    assert store.get_shard(run.id, 0, lease.shard_id)["holder"] == holder.peer_id
    assert run_view(store, run.id)["shards"]["done"] == 0


def test_receipt_for_an_unknown_shard_is_refused(run, store, book):
    session = _join(store, run.id)
    book.grant(run, session, max_shards=1)
    with pytest.raises(
        leases.ReceiptError, match="shard 'train-99999' of epoch 0 was never leased to this peer"
    ):
        book.complete(run, session, _receipt("train-99999"))
    with pytest.raises(
        leases.ReceiptError, match="shard 'train-00000' of epoch 1 was never leased to this peer"
    ):
        book.complete(run, session, _receipt("train-00000", epoch=1))
    assert store.list_receipts(run.id) == []


def test_receipt_that_ends_before_it_starts_is_refused(run, store, book):
    session = _join(store, run.id)
    [lease] = book.grant(run, session, max_shards=1)
    with pytest.raises(leases.ReceiptError, match="finishes before it starts"):
        book.complete(run, session, _receipt(lease.shard_id, started=20.0, finished=10.0))
    assert store.list_receipts(run.id) == []


def test_good_receipt_completes_the_shard_once(run, store, book):
    session = _join(store, run.id)
    [lease] = book.grant(run, session, max_shards=1)
    book.complete(run, session, _receipt(lease.shard_id))
    shard = store.get_shard(run.id, 0, lease.shard_id)
    assert (shard["state"], shard["holder"], shard["num_completions"]) == ("done", None, 1)
    [stored] = store.list_receipts(run.id)
    assert (stored["peer_id"], stored["shard_id"], stored["num_tokens"]) == (
        session.peer_id,
        lease.shard_id,
        992,
    )
    assert run_view(store, run.id)["shards"]["done"] == 1

    with pytest.raises(leases.ReceiptError, match="was already receipted"):
        book.complete(run, session, _receipt(lease.shard_id))
    assert len(store.list_receipts(run.id)) == 1
    new = book.grant(run, session, max_shards=8)
    assert lease.shard_id not in {lease.shard_id for lease in new}


def test_leave_returns_leased_shards_to_pending(run, store, book):
    leaving = _join(store, run.id, name="leaving")
    staying = _join(store, run.id, name="staying")
    held = {lease.shard_id for lease in book.grant(run, leaving, max_shards=4)}
    kept = {lease.shard_id for lease in book.grant(run, staying, max_shards=2)}
    peers.leave(store, book, leaving)
    assert run_view(store, run.id)["shards"] == {"total": 20, "pending": 18, "leased": 2, "done": 0}
    for shard_id in held:
        shard = store.get_shard(run.id, 0, shard_id)
        assert (shard["state"], shard["holder"]) == ("pending", None)
    # The returned shards are handed out again, first in line.
    regranted = {lease.shard_id for lease in book.grant(run, staying, max_shards=4)}
    assert regranted == held
    assert not regranted & kept


def test_finished_epoch_starts_the_next(run, store, book):
    session = _join(store, run.id)
    done = []
    while len(done) < 20:
        granted = book.grant(run, session, max_shards=8)
        assert granted and all(lease.epoch == 0 for lease in granted)
        for lease in granted:
            book.complete(run, session, _receipt(lease.shard_id))
            done.append(lease.shard_id)
    assert sorted(done) == sorted(s.id for s in run.manifest.train_shards)
    [lease] = book.grant(run, session, max_shards=1)
    assert lease.epoch == 1
    view = run_view(store, run.id)
    assert view["epoch"] == 1
    assert view["shards"] == {"total": 20, "pending": 19, "leased": 1, "done": 0}


def _swarm_beat(session, keys: SwarmKeys, reports=()) -> HeartbeatPayload:
    return HeartbeatPayload(
        session_key="session-" + keys.dht_peer_id[-8:],
        num_tokens=0,
        num_sequences=0,
        tokens_per_s=0.0,
        step=0,
        **keys.fields(session.run_id, session.public_key),
        reports=[PeerReport(dht_peer_id=d, reason=r, count=n) for d, r, n in reports],
    )


def _verified_receipt(
    store, session, shard_id: str, num_sequences: int = 1, received_at: float = 1.0
) -> None:
    """A verified receipt check for ``session``'s peer: it has done checked work."""
    store.insert_receipt_check(
        {
            "run_id": session.run_id,
            "peer_id": session.peer_id,
            "shard_id": shard_id,
            "epoch": 0,
            "num_sequences": num_sequences,
            "num_tokens": 32,
            "flops": 1.0,
            "device": "cpu",
            "device_s": 1.0,
            "started": 0.0,
            "finished": 1.0,
            "received_at": received_at,
            "status": "verified",
            "reason": "",
            "possible": "ok",
            "dht": "ok",
            "spot": "passed",
            "spot_reason": "",
            "micro_batch_size": 1,
            "samples_json": "[]",
            "assess_cpu_s": 0.0,
        }
    )


def test_a_sender_is_flagged_only_when_two_credited_peers_report_it_repeatedly(run, store):
    honest_a, honest_b, attacker = (_join(store, run.id, name=n) for n in ("a", "b", "evil"))
    keys = {"a": SwarmKeys(), "b": SwarmKeys(), "evil": SwarmKeys()}
    a, b, evil = (keys[n].dht_peer_id for n in ("a", "b", "evil"))
    for session, name in ((honest_a, "a"), (honest_b, "b"), (attacker, "evil")):
        peers.heartbeat(store, session, _swarm_beat(session, keys[name]))
    limit = 1.0 * run.spec.optimizer.target_batch_size  # newcomers
    assert sorted(records.roster(store, run)) == sorted([(a, limit), (b, limit), (evil, limit)])

    for session, shard in ((honest_a, "s-a"), (honest_b, "s-b"), (attacker, "s-e")):
        _verified_receipt(store, session, shard)

    # The attacker alone accuses an honest peer, many times: nothing happens.
    peers.heartbeat(store, attacker, _swarm_beat(attacker, keys["evil"], [(a, "norm", 50)]))
    # One honest peer's report of the attacker is not enough either.
    peers.heartbeat(store, honest_a, _swarm_beat(honest_a, keys["a"], [(evil, "non-finite", 2)]))
    assert all(p["flagged"] is None for p in peers_view(store, run.id))

    peers.heartbeat(store, honest_b, _swarm_beat(honest_b, keys["b"], [(evil, "weight", 1)]))
    flagged = {p["name"]: p["flagged"] for p in peers_view(store, run.id)}
    assert flagged["a"] is None and flagged["b"] is None
    assert "dropped by 2 peer(s) with verified work: non-finite, weight" in flagged["evil"]
    assert dict(records.roster(store, run))[evil] == 0.0

    # Fresh identities without verified work count for nothing, however many (free).
    for i in range(3):
        sybil = _join(store, run.id, name=f"sybil-{i}")
        sybil_keys = SwarmKeys()
        peers.heartbeat(store, sybil, _swarm_beat(sybil, sybil_keys, [(a, "norm", 50)]))
    assert {p["name"]: p["flagged"] for p in peers_view(store, run.id)}["a"] is None


def test_a_swarm_id_held_by_another_peer_is_refused_and_changes_nothing(run, store):
    first, second = _join(store, run.id, name="one"), _join(store, run.id, name="two")
    keys = SwarmKeys()
    peers.heartbeat(store, first, _swarm_beat(first, keys))
    before = peers_view(store, run.id)
    with pytest.raises(AccessError, match="belong to another peer"):
        peers.heartbeat(store, second, _swarm_beat(second, keys))
    assert peers_view(store, run.id) == before


def test_a_peers_weight_is_capped_by_its_verified_work_per_step(run, store):
    """A part's weight is its sender's claim: it counts for at most twice the sequences of
    the sender's verified receipts of the last 15 minutes per step the run made then
    (between a newcomer's one target batch and four), so weight is bought with checked
    work, not claimed (any identity could claim four target batches before)."""
    target = run.spec.optimizer.target_batch_size
    now = 100_000.0
    busy, slow, fresh, old = (
        _join(store, run.id, name=n) for n in ("busy", "slow", "fresh", "old")
    )
    keys = {name: SwarmKeys() for name in ("busy", "slow", "fresh", "old")}
    for session, name in ((busy, "busy"), (slow, "slow"), (fresh, "fresh"), (old, "old")):
        peers.heartbeat(store, session, _swarm_beat(session, keys[name]))
    # the run went from step 100 to 110 in the window
    store.insert_sample(
        {
            "run_id": run.id,
            "time": now - 1000,
            "step": 100,
            "num_tokens": 0,
            "tokens_per_s": 0.0,
            "num_peers": 4,
        }
    )
    store.raise_run_step(run.id, 110)
    _verified_receipt(store, busy, "s-busy", num_sequences=10 * target, received_at=now - 60)
    _verified_receipt(store, slow, "s-slow", num_sequences=8 * target, received_at=now - 60)
    _verified_receipt(store, old, "s-old", num_sequences=1000 * target, received_at=now - 2000)
    stored = store.get_run(run.id)
    assert stored is not None and stored["step"] == 110, stored
    caps = dict(records.roster(store, records.get_run(store, run.id), now=now))
    assert caps[keys["busy"].dht_peer_id] == 2.0 * target  # 2 x 10 targets / 10 steps
    assert caps[keys["slow"].dht_peer_id] == 1.6 * target
    assert caps[keys["fresh"].dht_peer_id] == 1.0 * target  # no verified work: a newcomer
    assert caps[keys["old"].dht_peer_id] == 1.0 * target  # its work is past the window
