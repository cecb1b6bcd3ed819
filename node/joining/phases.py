"""Joining a run, phase by phase: each phase builds whole objects from the ones before.

:func:`join` runs them in order; every check that can fail does so before
hivemind starts:

1. :func:`contact_coordinator`: device, identity, registration, the run's
   spec and data manifest checked against the coordinator's signature
   (a :class:`Contact`); :func:`prefetch_checkpoint` then plans the start and
   downloads the keeper's checkpoint in the background;
2. :func:`fetch_data`: the shard cache and the validation set (:class:`RunData`);
3. :func:`build_replica`: the model, its micro-batch and its forward pass
   (:class:`Replica`);
4. :func:`lease_first_shards`: the batch stream and its first shards on disk
   (:class:`Shards`);
5. :func:`join_swarm`: the DHT, the guard and the collaborative optimizer
   (:class:`SwarmPeer`);

then the link to the coordinator starts heartbeating. :func:`load_initial_state`
then brings a node joining a run under way to the swarm's parameters. A
phase that fails shuts down what the phases before it started, in the order
:meth:`Joined.stack` would. Knows nothing about the training loop.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import hivemind
import torch
from torch import nn

from crowdtrain.model import GPT, GPTConfig
from crowdtrain.node.config import NodeConfig
from crowdtrain.node.data import (
    ShardCache,
    ShardStream,
    load_position,
    validation_sequences,
)
from crowdtrain.node.device.device import describe_device, pick_device
from crowdtrain.node.device.micro_batch import micro_batch_size
from crowdtrain.node.device.precision import maybe_compile, prefer_expandable_segments
from crowdtrain.node.joining.bootstrap import (
    BootstrapError,
    CheckpointPrefetch,
    KeptCheckpoint,
    Prefetched,
    fall_back,
    start_from_checkpoint,
)
from crowdtrain.node.joining.reporting import Reporter
from crowdtrain.node.link.grpc import CoordinatorClient, Registration, check_run
from crowdtrain.node.link.heartbeat import CoordinatorLink, LinkConfig
from crowdtrain.node.link.http import RunView, discover
from crowdtrain.node.link.pins import KeyPins
from crowdtrain.node.link.session import CoordinatorSession
from crowdtrain.node.link.supply import ShardSupply
from crowdtrain.node.stats.accounting import NodeStats
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.node.swarm.binding import fresh_identity_path, swarm_proof
from crowdtrain.node.swarm.guard import SwarmGuard
from crowdtrain.node.swarm.heldout import HeldoutLoss
from crowdtrain.node.swarm.optimizer import SwarmOptimizer, build_optimizer, progress_key
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.identity import Identity
from crowdtrain.protocol.messages import SwarmProof
from crowdtrain.protocol.multiaddr import tcp_multiaddr
from crowdtrain.protocol.runspec import RunSpec
from crowdtrain.protocol.shards import ShardManifest
from crowdtrain.protocol.version import crowdtrain_version

logger = logging.getLogger(__name__)

# How long a node keeps asking for its first shard while every shard is leased.
_FIRST_LEASE_WAIT_S = 60.0


@dataclass(frozen=True)
class Contact:
    """A node registered with its coordinator: the session, and the run it joined
    (spec and manifest checked against the coordinator's signature)."""

    client: CoordinatorClient
    session: CoordinatorSession
    name: str
    device: torch.device
    device_name: str  # as the coordinator sees it (describe_device)
    registration: Registration
    spec: RunSpec
    manifest: ShardManifest


@dataclass(frozen=True)
class RunData:
    """The run's data on this node: its shard cache and validation set.

    ``val_sequences`` is int64 [n, seq_len + 1]; ``bytes_per_token`` is the text
    behind each token (1 for bytes, about 3-4 for BPE), for bits per byte.
    """

    cache: ShardCache
    val_sequences: torch.Tensor
    bytes_per_token: float


@dataclass(frozen=True)
class Replica:
    """This node's copy of the model: ``forward`` is the model, compiled when asked."""

    model: GPT
    micro_batch_size: int
    forward: nn.Module


@dataclass(frozen=True)
class Shards:
    """Micro-batches to train (``stream``) and where its shards come from (``supply``)."""

    stream: ShardStream
    supply: ShardSupply


@dataclass(frozen=True)
class SwarmPeer:
    """This node's place in the swarm: its DHT, guard and collaborative optimizer, and
    its identities there (hivemind peer id, the key signing its progress records)."""

    dht: hivemind.DHT
    guard: SwarmGuard
    optimizer: SwarmOptimizer
    dht_peer_id: str
    progress_key: str
    # Binds both ids to this node at the coordinator (node/swarm/binding.py).
    proof: SwarmProof | None


@dataclass(frozen=True)
class Joined:
    """Everything joining built, with its link to the coordinator running.

    ``stack`` shuts it all down in order: the link (last counters and receipts,
    then leaving the run), the optimizer, the DHT, the client.
    """

    contact: Contact
    data: RunData
    replica: Replica
    shards: Shards
    swarm: SwarmPeer
    link: CoordinatorLink
    stack: ExitStack
    # The keeper's checkpoint, planned and downloaded while the swarm was joined.
    prefetch: CheckpointPrefetch


def join(config: NodeConfig, stats: NodeStats, stop: threading.Event) -> Joined:
    """Join the run ``config`` names and start the link to the coordinator.

    ``stats`` are the counters the heartbeats report; ``stop`` is set when the
    coordinator ends the session for good. Create it in the process's main
    thread (hivemind installs signal handlers there). Raises what made a phase
    fail, after shutting down what earlier phases started.
    """
    with ExitStack() as stack:
        contact = contact_coordinator(config, stop, stack, stats.traffic)
        prefetch = prefetch_checkpoint(config, contact, stack)
        data = fetch_data(config, contact)
        with ExitStack() as leaving:
            # A join that fails from here still leaves the run (its leases go back).
            leaving.callback(contact.session.leave)
            replica = build_replica(config, contact)
            shards = lease_first_shards(config, contact, data, replica)
            swarm = join_swarm(config, contact, replica, data, stack)
            reporter = Reporter(
                stats,
                contact.device_name,
                swarm.dht_peer_id,
                swarm.progress_key,
                swarm.guard,
                swarm.proof,
            )
            link_config = LinkConfig(
                interval_s=contact.registration.heartbeat_interval_s,
                prefetch_shards=config.prefetch_shards,
            )
            link = CoordinatorLink(contact.session, shards.supply, link_config, reporter)
            # From here the link leaves, after its last heartbeat, and before the
            # swarm shuts down: it is pushed last, so it runs first.
            leaving.pop_all()
            stack.callback(link.shutdown)
        link.start()
        return Joined(contact, data, replica, shards, swarm, link, stack.pop_all(), prefetch)


def contact_coordinator(
    config: NodeConfig, stop: threading.Event, stack: ExitStack, traffic: Traffic
) -> Contact:
    """Pick the device, find the coordinator, register, and check the run it serves;
    the client counts its bytes in ``traffic``."""
    # Before anything touches CUDA: fragmented free memory made a probed batch fail.
    prefer_expandable_segments()
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    endpoints = discover(config.url, ca_cert=config.ca_cert)
    identity = Identity.load_or_create(config.home / "identity.pem")
    name = config.name or f"{socket.gethostname()}-{identity.peer_id[:6]}"
    client = CoordinatorClient(
        config.url,
        endpoints["grpc_target"],
        identity,
        tls=bool(endpoints.get("grpc_tls")),
        ca_cert=config.ca_cert,
        pins=KeyPins(config.home),
        progress=config.progress,
        traffic=traffic,
    )
    stack.callback(client.close)
    device_name = describe_device(device)
    versions = f"crowdtrain={crowdtrain_version()} torch={torch.__version__}"

    def register() -> Registration:
        return client.register(config.run_id, name, device_name, versions, invite=config.invite)

    registration = register()
    spec, manifest = check_run(registration.run)
    logger.info(
        "crowdtrain %s, run %s, spec %s, data %s, device %s, torch %s, hivemind %s",
        crowdtrain_version(),
        spec.run.id,
        spec.hash[:16],
        manifest.hash[:16],
        device_name,
        torch.__version__,
        hivemind.__version__,
    )
    session = CoordinatorSession(
        client, registration.session_token, lambda: register().session_token, stop
    )
    return Contact(client, session, name, device, device_name, registration, spec, manifest)


def prefetch_checkpoint(
    config: NodeConfig, contact: Contact, stack: ExitStack
) -> CheckpointPrefetch:
    """Plan where the parameters come from and download the keeper's checkpoint in the
    background while the next phases run (:func:`load_initial_state` uses it); what it
    downloaded and nobody used is removed with the node."""
    prefetch = CheckpointPrefetch(
        config.start_from,
        config.url,
        config.run_id,
        contact.registration.run.step,
        contact.spec.optimizer.mode,
        config.run_dir / "bootstrap",
        config.ca_cert,
        config.progress,
    )
    stack.callback(prefetch.discard)
    return prefetch


def fetch_data(config: NodeConfig, contact: Contact) -> RunData:
    """The shard cache, and the validation shard's sequences (downloaded and checked)."""
    manifest, spec = contact.manifest, contact.spec
    cache = ShardCache(
        config.run_dir / "shards" / manifest.hash[:16],
        manifest,
        contact.registration.run.shard_base_url,
        contact.client.download,
        max_bytes=config.cache_bytes,
    )
    val_entry = manifest.val_shards[0]
    sequences = validation_sequences(
        cache.fetch(val_entry.id), val_entry, spec.model.seq_len, spec.eval.num_sequences
    )
    return RunData(
        cache,
        torch.from_numpy(sequences),
        bytes_per_token=val_entry.num_bytes / max(1, val_entry.num_tokens),
    )


def build_replica(config: NodeConfig, contact: Contact) -> Replica:
    """The run's model at its seeded initialization on this node's device, the micro-batch
    it trains with, and its forward pass (compiled with ``--compile``)."""
    spec, device = contact.spec, contact.device
    torch.manual_seed(spec.run.seed)
    model = GPT(GPTConfig.from_spec(spec.model)).to(device)
    micro_batch = micro_batch_size(
        config.micro_batch,
        spec.optimizer,
        model,
        device,
        spec.model,
        memory_cap_bytes=config.hooks.memory_cap_bytes,
    )
    forward = maybe_compile(
        model,
        config.compile,
        example_batch=(micro_batch, spec.model.seq_len, spec.model.vocab_size),
    )
    return Replica(model, micro_batch, forward)


def lease_first_shards(
    config: NodeConfig, contact: Contact, data: RunData, replica: Replica
) -> Shards:
    """The batch stream (resuming where a restarted node was) and its first shards, leased
    and verified on disk; raises when every shard stays leased to others for a minute."""
    wanted = threading.Event()
    stream = ShardStream(
        contact.spec.run.seed,
        contact.spec.model.seq_len,
        replica.micro_batch_size,
        resume=load_position(config.position_path, contact.manifest.hash),
        on_shard_taken=wanted.set,
        # A sync peer's parameters stay its step's for every micro-batch (unless hivemind
        # applies the step in the background): the verifier may check any of them.
        sample_every_batch=(
            contact.spec.optimizer.mode == "sync"
            and not contact.spec.optimizer.delay_optimizer_step
        ),
    )
    supply = ShardSupply(contact.session, data.cache, stream, wanted)
    deadline = time.monotonic() + _FIRST_LEASE_WAIT_S
    while not supply.lease_and_fetch(config.prefetch_shards, resume=True):
        if time.monotonic() > deadline:
            raise CrowdtrainError(
                "every shard of the current epoch is leased to other peers; "
                "try again when their leases end"
            )
        time.sleep(2.0)
    return Shards(stream, supply)


def join_swarm(
    config: NodeConfig, contact: Contact, replica: Replica, data: RunData, stack: ExitStack
) -> SwarmPeer:
    """Start the DHT, the guard and the collaborative optimizer (in the main thread); the
    guard judges downloaded state on ``data``'s validation sequences."""
    announce = None
    if config.announce_host:
        announce = [tcp_multiaddr(config.announce_host, config.dht_port)]
    client, spec = contact.client, contact.spec
    # Tear the gRPC channel down around the fork: hivemind forks its DHT and
    # averager processes, and gRPC's threads must not be copied into them.
    client.suspend()
    identity_path = fresh_identity_path(config.run_dir)
    try:
        dht = hivemind.DHT(
            initial_peers=contact.registration.initial_peers,
            start=True,
            host_maddrs=[tcp_multiaddr(config.dht_host, config.dht_port)],
            announce_maddrs=announce,
            client_mode=config.client_mode,
            identity_path=str(identity_path),
        )
        stack.callback(dht.shutdown)
        guard_dir = config.run_dir / "guard"
        guard = SwarmGuard(
            guard_dir,
            spec.optimizer.target_batch_size,
            attack=config.hooks.attack,
            coordinator=RunView(
                config.url,
                config.run_id,
                guard_dir,
                partial(client.download, purpose="state"),
                config.ca_cert,
                client.traffic,
            ),
            named_parameters=replica.model.named_parameters(remove_duplicate=False),
            traffic=client.traffic,
            trust=spec.trust,
        )
        guard.heldout_loss = HeldoutLoss(spec, data.val_sequences)
        with _sigint_kept():
            optimizer = build_optimizer(spec, replica.model, dht, guard, replica.micro_batch_size)
        stack.callback(optimizer.shutdown)
    finally:
        client.reopen()
    dht_peer_id = dht.peer_id.to_base58()
    logger.info("joined the swarm as %s", dht_peer_id)
    key = progress_key(optimizer)
    proof = swarm_proof(identity_path, config.run_id, client.identity.public_key, dht_peer_id, key)
    return SwarmPeer(dht, guard, optimizer, dht_peer_id, key, proof)


@contextmanager
def _sigint_kept() -> Iterator[None]:
    """Give SIGINT back its handler once hivemind's averagers have started: they set it to
    be ignored (so that their processes, forked then, ignore Ctrl-C) and never restore
    it, which would lose a Ctrl-C pressed while the node loads state or starts training."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def load_initial_state(config: NodeConfig, joined: Joined) -> None:
    """The swarm's parameters for a node joining a run under way: the keeper's checkpoint
    over HTTP or the peers' state (see :func:`crowdtrain.node.joining.bootstrap.plan_start`)."""
    optimizer = joined.swarm.optimizer
    prefetched = joined.prefetch.result()
    if prefetched.plan is None:  # --start-from checkpoint with none kept, say
        assert prefetched.error is not None
        raise prefetched.error
    plan = prefetched.plan
    if plan.source != "fresh":
        logger.info("starting from %s: %s", plan.source, plan.reason)
    if plan.source == "checkpoint" and plan.checkpoint is not None:
        if prefetched.error is not None:
            if config.start_from == "checkpoint":
                raise prefetched.error
            logger.warning(
                "could not download the keeper's checkpoint (%s); using peers", prefetched.error
            )
        elif _start_from_checkpoint(config, joined, plan.checkpoint, prefetched):
            return
    if plan.source != "fresh" or optimizer.tracker.global_epoch > 0:
        _load_state_from_peers(optimizer, joined.contact.client.traffic)
    if fall_back(plan, optimizer.local_epoch) and plan.checkpoint is not None:
        logger.info("no peer served newer state; starting from the keeper's checkpoint")
        _start_from_checkpoint(config, joined, plan.checkpoint)


def _start_from_checkpoint(
    config: NodeConfig,
    joined: Joined,
    checkpoint: KeptCheckpoint,
    files: Prefetched | None = None,
) -> bool:
    """Load the keeper's checkpoint and move the optimizer to its step; False (the model
    untouched) when it cannot be used, unless ``--start-from checkpoint`` asked for it."""
    try:
        start_from_checkpoint(
            joined.replica.model,
            joined.swarm.optimizer,
            joined.contact.spec,
            config.url,
            checkpoint,
            config.run_dir / "bootstrap",
            config.ca_cert,
            config.progress,
            joined.contact.client.traffic,
            files,
        )
    except BootstrapError as e:
        if config.start_from == "checkpoint":
            raise
        logger.warning("could not start from the keeper's checkpoint (%s); using peers", e)
        return False
    return True


def _load_state_from_peers(optimizer: SwarmOptimizer, traffic: Traffic) -> None:
    logger.info("run under way; loading the latest state from peers")
    started = time.monotonic()
    received = traffic.received("state")
    try:
        with warnings.catch_warnings():
            # hivemind fast-forwards the learning-rate schedule to the loaded step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            optimizer.load_state_from_peers()
    except Exception as e:  # a failed download is not fatal: hivemind retries at the next step
        logger.warning("could not load state from peers yet: %s", e)
        return
    refusal = optimizer.last_refusal
    if refusal is not None:
        logger.warning(
            "refused the state peers served (%s); training from step %d until a peer "
            "serves state the coordinator agrees with",
            refusal,
            optimizer.local_epoch,
        )
        return
    if traffic.received("state") == received:  # hivemind returns quietly when no peer served
        logger.warning(
            "no peer served its state; training from step %d until the swarm's state arrives",
            optimizer.local_epoch,
        )
        return
    logger.info(
        "loaded state of step %d in %.1fs (%.1f MB)",
        optimizer.local_epoch,
        time.monotonic() - started,
        (traffic.received("state") - received) / 1e6,
    )


__all__ = [
    "Contact",
    "Joined",
    "Replica",
    "RunData",
    "Shards",
    "SwarmPeer",
    "contact_coordinator",
    "fetch_data",
    "build_replica",
    "join",
    "join_swarm",
    "prefetch_checkpoint",
    "lease_first_shards",
    "load_initial_state",
]
