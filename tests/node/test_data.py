"""A node's shard cache and batch stream, without a coordinator."""

from pathlib import Path

import numpy as np
import pytest

from crowdtrain.node.data import LeasedShard, ShardCache, ShardStream
from crowdtrain.protocol.errors import ShardError
from crowdtrain.protocol.shards import (
    MANIFEST_VERSION,
    ShardEntry,
    ShardManifest,
    batch_windows,
    num_windows,
    read_shard,
    sequence_order,
    write_shard,
)

SEQ_LEN = 16


def make_data(folder: Path, num_shards: int = 4, num_tokens: int = 1000) -> ShardManifest:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    rng = np.random.default_rng(0)
    for i in range(num_shards + 1):
        split = "val" if i == num_shards else "train"
        name = f"{split}-{i:05d}"
        tokens = rng.integers(0, 256, num_tokens, dtype=np.uint8)
        size, sha = write_shard(folder / f"{name}.bin", tokens, "uint8")
        entries.append(
            ShardEntry(
                id=name,
                file=f"{name}.bin",
                split=split,
                num_tokens=num_tokens,
                size_bytes=size,
                sha256=sha,
                num_bytes=num_tokens,
            )
        )
    return ShardManifest(
        version=MANIFEST_VERSION,
        tokenizer="byte",
        vocab_size=256,
        dtype="uint8",
        shards=tuple(entries),
        source="test",
    )


class Server:
    """Stands in for the coordinator's HTTP shard route; can serve damaged bytes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[str] = []
        self.damage = 0

    def download(self, url: str, dest: Path, max_bytes: int) -> None:
        shard_id = url.rsplit("/", 1)[1]
        self.requests.append(shard_id)
        data = bytearray((self.folder / f"{shard_id}.bin").read_bytes())
        assert len(data) <= max_bytes  # the cap is the manifest's size of the shard
        if self.damage:
            self.damage -= 1
            data[-1] ^= 0xFF
        dest.write_bytes(bytes(data))


@pytest.fixture
def served(tmp_path: Path) -> tuple[ShardManifest, Server]:
    manifest = make_data(tmp_path / "origin")
    return manifest, Server(tmp_path / "origin")


def test_fetch_downloads_once_and_reuses_the_verified_file(tmp_path, served) -> None:
    manifest, server = served
    cache = ShardCache(tmp_path / "cache", manifest, "http://c/shards", server.download)
    path = cache.fetch("train-00000")
    assert cache.fetch("train-00000") == path
    assert server.requests == ["train-00000"]


def test_a_damaged_download_is_fetched_again_once(tmp_path, served) -> None:
    manifest, server = served
    server.damage = 1
    cache = ShardCache(tmp_path / "cache", manifest, "http://c/shards", server.download)
    cache.fetch("train-00001")
    assert server.requests == ["train-00001", "train-00001"]


def test_two_damaged_downloads_stop_with_the_shard_named(tmp_path, served) -> None:
    manifest, server = served
    server.damage = 2
    cache = ShardCache(tmp_path / "cache", manifest, "http://c/shards", server.download)
    with pytest.raises(ShardError, match="shard train-00002 failed its sha256 check twice"):
        cache.fetch("train-00002")
    assert not (tmp_path / "cache" / "train-00002.bin").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cached_file_is_replaced(tmp_path, served, damage) -> None:
    manifest, server = served
    cache = ShardCache(tmp_path / "cache", manifest, "http://c/shards", server.download)
    path = cache.fetch("train-00000")
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[:-10]) if damage == "truncate" else bytes(raw[:-1] + b"\0"))
    cache.fetch("train-00000")
    assert server.requests == ["train-00000", "train-00000"]


def test_a_shard_not_in_the_manifest_is_refused(tmp_path, served) -> None:
    manifest, server = served
    cache = ShardCache(tmp_path / "cache", manifest, "http://c/shards", server.download)
    with pytest.raises(ShardError, match="not in the run's manifest"):
        cache.fetch("../etc/passwd")


def test_the_cache_stays_within_its_bound_but_keeps_pinned_shards(tmp_path, served) -> None:
    manifest, server = served
    one = manifest.shards[0].size_bytes
    cache = ShardCache(
        tmp_path / "cache", manifest, "http://c/shards", server.download, max_bytes=2 * one
    )
    for i in range(4):
        cache.fetch(f"train-0000{i}")
    evicted = cache.evict(keep={"train-00000"})
    left = sorted(p.stem for p in (tmp_path / "cache").glob("*.bin"))
    assert "train-00000" in left and len(left) == 2
    assert set(evicted) == {"train-00001", "train-00002"}


def stream_of(manifest, folder, resume=None) -> ShardStream:
    stream = ShardStream(run_seed=3, seq_len=SEQ_LEN, batch_size=4, resume=resume)
    for entry in manifest.train_shards[:2]:
        stream.offer(LeasedShard(entry.id, 0, folder / entry.file, entry))
    return stream


def drain(stream: ShardStream, n: int) -> list[np.ndarray]:
    return [stream.next_batch()[0] for _ in range(n)]


def test_the_order_within_a_shard_is_the_same_on_every_node(tmp_path, served) -> None:
    manifest, _ = served
    origin = tmp_path / "origin"
    first, second = drain(stream_of(manifest, origin), 5), drain(stream_of(manifest, origin), 5)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0].shape == (4, SEQ_LEN + 1) and first[0].dtype == np.int64


def test_a_shard_is_replayed_in_a_new_order_when_no_new_one_came(tmp_path, served) -> None:
    manifest, _ = served
    entry = manifest.train_shards[0]
    stream = ShardStream(run_seed=3, seq_len=SEQ_LEN, batch_size=4)
    stream.offer(LeasedShard(entry.id, 0, tmp_path / "origin" / entry.file, entry))
    per_pass = (entry.num_tokens - 1) // SEQ_LEN // 4
    first = drain(stream, per_pass)
    _, progress = stream.next_batch()
    assert progress.replay == 1 and stream.num_replays == 1
    assert not np.array_equal(first[0], stream.next_batch()[0])


def test_a_restarted_node_resumes_where_it_was(tmp_path, served) -> None:
    manifest, _ = served
    origin = tmp_path / "origin"
    stream = stream_of(manifest, origin)
    drain(stream, 3)
    position = stream.position()
    assert position is not None and position["batches_done"] == 0  # not yet credited
    _, progress = stream.next_batch()
    progress.batches_done = 4
    progress.num_sequences = 16
    position = stream.position()
    reference = drain(stream_of(manifest, origin), 8)[4:]
    resumed = stream_of(manifest, origin, resume=position)
    batches = drain(resumed, 4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, reference, strict=True))


def test_data_wait_is_accounted(tmp_path, served) -> None:
    manifest, _ = served
    stream = stream_of(manifest, tmp_path / "origin")
    drain(stream, 3)
    assert stream.data_wait_s > 0


def test_a_shard_shorter_than_a_micro_batch_is_one_smaller_batch(tmp_path, served) -> None:
    # A GPU probes a large micro-batch; a corpus's last shard may hold fewer sequences.
    manifest, _ = served
    entry = manifest.train_shards[0]
    windows = num_windows(entry.num_tokens, SEQ_LEN)
    stream = ShardStream(run_seed=3, seq_len=SEQ_LEN, batch_size=windows + 40)
    stream.offer(LeasedShard(entry.id, 0, tmp_path / "origin" / entry.file, entry))
    batch, progress = stream.next_batch()
    assert batch.shape == (windows, SEQ_LEN + 1)
    assert progress.num_batches == 1 and progress.receipt().micro_batch_size == windows
    # The verifier cuts the shard by the receipt's micro-batch size: the same sequences.
    tokens = read_shard(tmp_path / "origin" / entry.file)
    order = sequence_order(3, 0, entry.id, len(tokens), SEQ_LEN, windows)
    assert np.array_equal(batch, batch_windows(tokens, order, 0, windows, SEQ_LEN))


def test_a_shard_returns_its_receipt_once_when_done_and_never_for_a_replay(
    tmp_path, served
) -> None:
    manifest, _ = served
    entry = manifest.train_shards[0]
    stream = ShardStream(run_seed=3, seq_len=SEQ_LEN, batch_size=4)
    stream.offer(LeasedShard(entry.id, 0, tmp_path / "origin" / entry.file, entry))
    receipts = []
    _, progress = stream.next_batch()
    for index in range(progress.num_batches):
        if index:
            _, progress = stream.next_batch()
        wants = progress.wants_sample(step=0)
        if index == 1:  # a skipped micro-batch still ends the shard, untrained
            receipts.append(progress.skip())
        else:
            sample = [2.0, 3.0] if wants else None
            receipts.append(progress.record(4, 4 * SEQ_LEN, 2.5, step=0, sample=sample))
    *before, receipt = receipts
    assert before == [None] * (progress.num_batches - 1) and receipt is not None
    trained = progress.num_batches - 1
    assert (receipt.shard_id, receipt.epoch, receipt.micro_batch_size) == (entry.id, 0, 4)
    assert (receipt.num_sequences, receipt.num_tokens) == (4 * trained, 4 * trained * SEQ_LEN)
    assert receipt.loss_sum == pytest.approx(2.5 * 4 * trained)
    assert [(s.step, s.batch, s.losses) for s in receipt.samples] == [(0, 0, [2.0, 3.0])]
    _, replay = stream.next_batch()  # no new shard: the same one again, in a new order
    assert replay.replay == 1
    assert all(replay.record(4, 64, 2.5, step=1) is None for _ in range(replay.num_batches))


def test_a_sync_stream_samples_every_micro_batch_so_the_verifier_picks_any(
    tmp_path, served
) -> None:
    """A claimant that computes the losses of each step's first micro-batch only would pass
    a check that can only pick those; in a sync run every micro-batch is a candidate."""
    manifest, _ = served
    entry = manifest.train_shards[0]
    stream = ShardStream(run_seed=3, seq_len=SEQ_LEN, batch_size=4, sample_every_batch=True)
    stream.offer(LeasedShard(entry.id, 0, tmp_path / "origin" / entry.file, entry))
    _, progress = stream.next_batch()
    receipt = None
    for index in range(progress.num_batches):
        if index:
            _, progress = stream.next_batch()
        step = index // 2  # two micro-batches a step
        sample = [float(index)] if progress.wants_sample(step) else None
        receipt = progress.record(4, 4 * SEQ_LEN, 2.5, step=step, sample=sample)
    assert receipt is not None
    batches = [(s.step, s.batch, s.losses) for s in receipt.samples]
    assert batches == [(i // 2, i, [float(i)]) for i in range(progress.num_batches)]
