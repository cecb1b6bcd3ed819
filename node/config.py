"""What a node is asked to do: :class:`NodeConfig`.

The command line and the notebook API fill one from flags or options, with
the test hooks read once from the environment where the process starts.
Plain data: nothing here starts or imports hivemind. What a node counts is
:mod:`crowdtrain.node.stats.accounting`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crowdtrain.node.device.hooks import TestHooks


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to join; the command line fills it from flags."""

    url: str
    run_id: str
    home: Path = Path.home() / ".crowdtrain"
    name: str = ""
    device: str = "auto"
    threads: int | None = None
    # The nice value training runs at once it started (0: as started; the command line
    # gives 10, so the owner's programs come first on a busy CPU).
    nice: int = 0
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
    # "checkpoint" (the keeper's, over HTTP); see crowdtrain.node.joining.bootstrap.plan_start.
    start_from: str = "auto"
    # Test hooks that make the node misbehave on purpose (TestHooks.from_env(), read by
    # the command line and the notebook's join); the default is an ordinary node.
    hooks: TestHooks = TestHooks()

    @property
    def run_dir(self) -> Path:
        """Where this node keeps the run's files (shards, checkpoint, guard files)."""
        return self.home / "runs" / self.run_id

    @property
    def checkpoint_path(self) -> Path:
        """Where the node saves the model (at each evaluation and on leaving)."""
        return self.run_dir / "checkpoint.safetensors"

    @property
    def position_path(self) -> Path:
        """Where the node records its place in its shard, to resume after a restart."""
        return self.run_dir / "position.json"
