"""What a node is asked to do (:class:`NodeConfig`) and what it counts (:class:`NodeStats`).

The command line and the notebook API fill a NodeConfig; the trainer fills
NodeStats. Plain data: nothing here starts or imports hivemind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to join; the command line fills it from flags."""

    url: str
    run_id: str
    home: Path = Path.home() / ".crowdtrain"
    name: str = ""
    device: str = "auto"
    threads: int | None = None
    progress: str = "auto"
    dht_host: str = "127.0.0.1"
    dht_port: int = 0
    announce_host: str | None = None
    client_mode: bool = False
    cache_bytes: int | None = 4 << 30
    prefetch_shards: int = 2
    # An invite code, for a run whose [access] mode is "invite" (needed once).
    invite: str = ""
    # A PEM file of the authority that signed the coordinator's TLS certificate.
    ca_cert: Path | None = None
    # Sequences per forward pass: "auto" (CUDA probes its memory; CPU takes the
    # run's micro_batch_size) or a number.
    micro_batch: str = "auto"
    # torch.compile the model (opt-in: compiling takes a while, then runs faster on GPUs).
    compile: bool = False
    # Where a node joining a run under way gets its parameters: "auto", "peers" or
    # "checkpoint" (the keeper's, over HTTP); see crowdtrain.node.bootstrap.plan_start.
    start_from: str = "auto"


@dataclass
class NodeStats:
    """Counters a node reports; cumulative since this node process started."""

    session_key: str
    num_tokens: int = 0
    num_sequences: int = 0
    tokens_per_s: float = 0.0
    loss: float | None = None
    step: int = 0
    num_peers: int = 0
    val_loss: float | None = None
    num_skipped_steps: int = 0
    train_s: float = 0.0
    data_wait_s: float = 0.0
    shard: str = ""  # the shard being trained
    verified_tokens: int = 0  # this peer's tokens the coordinator has verified, run-wide
