"""What the ledger's and the spot checks' unit tests (and bench/catch_rate.py) share: their
prepared data and run, a peer with its DHT evidence and leases, receipts, submitting them
as ReportShard does, and checkpoints to check them against."""

import time
from pathlib import Path

import numpy as np
import torch

from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.runs.publish import prepare_publication, publish
from crowdtrain.coordinator.swarm.checkpoints import CHECKPOINTS_DIR
from crowdtrain.coordinator.swarm.dht import ProgressObservation, subkey_hex
from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint, sequence_losses
from crowdtrain.protocol.messages import ReceiptPayload
from crowdtrain.protocol.shards import batch_windows, read_shard, sequence_order
from tests.coordinator.registration import COORDINATOR_KEY, join_peer
from tests.specs import small_spec

SEQ_LEN, MICRO_BATCH = 32, 4
# The prepared shards hold 1024 tokens: 31 windows, 7 micro-batches of 4.
CAPACITY = 28
STEP = 3


def prepare_small_data(root: Path) -> Path:
    """A prepared data folder of 20 train shards (the last 501 tokens) and one val shard."""
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        line = f"document {i}: the quick brown fox jumps over the lazy dog.\n"
        (corpus / f"doc{i:02d}.txt").write_text(line * 50, encoding="utf-8")
    out = root / "data"
    prepare_data(PrepareConfig(sources=(corpus,), out=out, shard_tokens=1024, val_fraction=0.2))
    return out


def ledger_spec(
    run_id: str, fraction: float | None, optimizer: dict | None = None, **more: object
) -> str:
    """The ledger tests' run; ``fraction`` None leaves [verify] out; ``more`` of it;
    ``optimizer`` keys override the run's."""
    verify = {"spot_check_fraction": fraction, "checkpoint_every_s": 5, **more}
    return small_spec(
        run={"id": run_id, "seed": 5},
        verify=verify if fraction is not None else None,
        **({"optimizer": optimizer} if optimizer else {}),
    )


def publish_run(store, prepared, tmp_path, run_id, fraction, optimizer=None, **verify):
    spec_path = tmp_path / f"{run_id}.toml"
    spec_path.write_text(ledger_spec(run_id, fraction, optimizer, **verify), encoding="utf-8")
    return get_run(
        store, publish(store, prepare_publication(spec_path, prepared), COORDINATOR_KEY).run_id
    )


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


def write_checkpoint(store, run, step, seed=11, created_at=None):
    """A checkpoint of ``step`` as the keeper writes it: a seeded model, returned."""
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


def honest_losses(run, shard_id, batch, model, n=MICRO_BATCH, epoch=0):
    """The per-sequence losses ``model`` gives on micro-batch ``batch`` of a shard."""
    entry = next(s for s in run.manifest.train_shards if s.id == shard_id)
    tokens = read_shard(run.data_path / entry.file)
    order = sequence_order(run.spec.run.seed, epoch, shard_id, len(tokens), SEQ_LEN, MICRO_BATCH)
    inputs = torch.from_numpy(batch_windows(tokens, order, batch, MICRO_BATCH, SEQ_LEN))[:n]
    with torch.no_grad():
        logits, _ = model(inputs[:, :-1])
        return sequence_losses(logits, inputs[:, 1:]).tolist()
