"""The round follower: a DiLoCo participant that trains nothing and holds every round's state.

The coordinator's keeper runs one per DiLoCo run (``python -m
crowdtrain.node.swarm.follower``, a process of its own) instead of pulling
state from volunteers. At each round's end it joins the round's group with
weight 0: it sends a zero part that counts for nothing, reduces its share
of the slices like any publicly reachable peer (so a swarm whose every node
is behind NAT still finds a reducer) and receives the round's exact average,
the same bytes every node receives. It applies the run's outer step to the
same global parameters, so it holds round ``r + 1`` bit for bit as the nodes
do; the hash the group gathered for round ``r`` is checked against its own
(a disagreement is logged, never adopted: its state is built from checked
rounds, a peer's claim is not). Each round's global parameters and outer momentum go to an outbox
folder (``round-<r>.safetensors`` and ``round-<r>.outer.safetensors``) that
the keeper turns into checkpoints; it also serves its state to peers through
hivemind, announced half a round above theirs, so peers that missed a round
load it from here rather than from a volunteer.

Only when it missed a round (it came late, or its group failed) does it load
the next round from a peer, and says so. When no peer can serve it (every node
in client mode, the round failed for everyone), it goes on at the swarm's round
with the parameters it holds, and the next round's group converges on them:
client-mode nodes need it as their reducer, so it must not wait for a state
nobody serves. It reports no training progress.

For a sync run the same process runs the step follower instead
(:mod:`~crowdtrain.node.swarm.step_follower`), which writes the swarm's
parameters at its steps to the same outbox.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hivemind
import torch

from crowdtrain.model import load_checkpoint, params_sha256
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.node.swarm.compression import compression
from crowdtrain.node.swarm.diloco_state import (
    GlobalState,
    StateExchange,
    failure_reason,
    served_state,
)
from crowdtrain.node.swarm.following import (
    FOLLOWER_BONUS,
    FollowerStats,
    put_in_outbox,
    seeded_model,
)
from crowdtrain.node.swarm.guard import GuardConfig, SwarmGuard
from crowdtrain.node.swarm.heldout import HeldoutLoss
from crowdtrain.node.swarm.rounds import (
    ROUND_PATIENCE,
    RoundTracker,
    await_round_group,
    canonical_sha256,
    others_may_still_meet,
    outer_optimizer,
    outer_step,
    round_averager,
    round_bits,
    round_tracker,
)
from crowdtrain.node.swarm.step_follower import StepFollower
from crowdtrain.protocol.messages import MAX_WEIGHT_BATCHES, NEWCOMER_WEIGHT_BATCHES
from crowdtrain.protocol.runspec import RunSpec, load_spec

logger = logging.getLogger(__name__)

# How often a follower kept out of its round says why (the swarm's progress as it reads it).
WAIT_REPORT_S = 30.0

VOUCH_MARGIN = 1.5
"""A round whose global parameters lose this many nats more on held-out sequences than the
last round written is not written or served (:meth:`RoundFollower._vouches`). One honest
node's round alone raised the loss by up to 1.03 nats (the outer Nesterov momentum
overshoots); a flip x9.9 of one round, by 2 to 7."""


class RoundFollower:
    """Follows a DiLoCo run's rounds from ``start`` (round, global parameters, outer
    momentum in ``model.parameters()`` order), writing each round it reaches to
    ``outbox``. Create it in the process's main thread; call :meth:`shutdown`."""

    def __init__(
        self,
        spec: RunSpec,
        dht: hivemind.DHT,
        outbox: Path,
        start: GlobalState,
        guard: Path,
        heldout: Path | None = None,
    ):
        """``guard`` is the guard's folder: the keeper writes the run's roster (each
        peer's largest averaging weight, as nodes get it) there as ``roster.json``; the
        senders whose parts the follower dropped go to ``reports.jsonl``. ``heldout`` is
        a validation shard: a round's state a peer serves is refused when its loss there
        is well above our own global parameters' (nothing else vouches for it: we make
        the checkpoints)."""
        self.spec, self.dht, self.outbox = spec, dht, outbox
        self.run_id = spec.run.id
        swarm, opt = spec.swarm, spec.optimizer
        self.model = seeded_model(spec)
        self.names = [name for name, _ in self.model.named_parameters()]
        self._tied: dict[str, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            self._tied.setdefault(str(id(param)), []).append(name)
        self._params = list(self.model.parameters())
        self.global_params = [p.detach().clone().float() for p in start.params]
        self.outer = outer_optimizer(self.global_params, opt)
        for global_, momentum in zip(self.global_params, start.momentum, strict=True):
            self.outer.state[global_]["momentum_buffer"] = momentum.clone().float()
        self.round = start.round
        self.traffic = Traffic()
        self.stats = FollowerStats(round=start.round, traffic=self.traffic)
        self._lock = threading.Lock()
        self._round_timeout_s = max(swarm.averaging_timeout_s, 2 * swarm.matchmaking_time_s)
        self._averaging_timeout_s = swarm.averaging_timeout_s
        self._request_timeout_s = swarm.request_timeout_s

        self.tracker = self._new_tracker()
        try:
            # Weights as a node bounds them: the roster's, a newcomer's for a peer it does
            # not list yet.
            self.averager = round_averager(
                dht,
                self.run_id,
                opt,
                swarm,
                like=self.global_params,
                guard=GuardConfig(
                    guard,
                    NEWCOMER_WEIGHT_BATCHES * opt.target_batch_size,
                    traffic=self.traffic,
                    trust=spec.trust,
                    max_claim=MAX_WEIGHT_BATCHES * opt.target_batch_size,
                ),
                use_roster=True,
                current_state=self._current_state,
                compression=compression(opt.pseudo_grad_compression),
                state_compression=compression("none"),
                client_mode=False,
                start_round=self.round,
            )
        except BaseException:
            self.tracker.shutdown(1.0)
            raise
        judge = None
        if heldout is not None:
            judge = SwarmGuard(
                guard,
                opt.target_batch_size,
                named_parameters=self.model.named_parameters(remove_duplicate=False),
                keep_files=True,  # the keeper writes the roster there
            )
            judge.heldout_loss = HeldoutLoss.from_shard(spec, heldout)
            judge.reference_state = lambda round_: self._state_dict()
        self._judge = judge
        # The held-out loss of the last round written (None: not judged, or none yet).
        self._vouched_loss: float | None = None
        self.exchange = StateExchange(
            self.averager,
            dht,
            self.run_id,
            like=self.global_params,
            model_params=self._params,
            num_peers=lambda: self.tracker.global_progress.num_peers + 1,
            swarm_guard=judge,
        )
        self._announce()
        self._write(self.round)

    def _new_tracker(self) -> RoundTracker:
        tracker = round_tracker(
            self.dht,
            self.run_id,
            self.spec.optimizer,
            self.spec.swarm,
            client_mode=True,
            eager=True,
        )
        with tracker.pause_updates():
            tracker.update_epoch(self.round)
        return tracker

    # the loop

    def run(self, stop: threading.Event) -> None:
        """Follow rounds until ``stop`` is set."""
        waiting_since = last_said = time.monotonic()
        while not stop.is_set():
            progress = self.tracker.global_progress
            # Client-mode nodes start round r's averaging reporting round r + 1 (and their
            # samples of round r are gone from their records): hivemind's readiness sees
            # neither, and the nodes, which need us as their reducer, failed round after
            # round while we waited at "0 of 80 samples" (make soak, the stalled test).
            swarm_round = max(progress.epoch, self.tracker.majority_round() or 0)
            ready = self.tracker.ready_to_update_epoch or swarm_round > self.round
            if progress.num_peers == 0 or not ready:
                now = time.monotonic()
                if now - last_said >= WAIT_REPORT_S:
                    # What keeps us out of the round, for whoever reads why nodes meet
                    # nobody (fresh-clone CI: client-mode nodes failed round 0 for four
                    # minutes while we had not joined it).
                    last_said = now
                    logger.info(
                        "waiting %.0f s for round %d: the swarm's progress shows %d peers, "
                        "%d of %d samples at round %d",
                        now - waiting_since,
                        self.round,
                        progress.num_peers,
                        progress.samples_accumulated,
                        progress.target_batch_size,
                        progress.epoch,
                    )
                stop.wait(0.1)
                continue
            waiting_since = last_said = time.monotonic()
            if swarm_round > self.round + 1:
                # The swarm is rounds ahead (we started late): only a peer has its state.
                self._catch_up(swarm_round, f"the swarm is at round {swarm_round}")
            else:
                self._follow(self.round)

    def _follow(self, round_: int) -> None:
        """Average round ``round_`` with its group and apply the outer step."""
        own_sha256 = self.global_sha256()
        with self.tracker.pause_updates():
            self.tracker.update_epoch(round_ + 1)
        with torch.no_grad(), self.averager.get_tensors() as parts:
            for part in parts:
                part.zero_()
        self.averager.set_group_bits(round_bits(round_))
        gather = {"round": round_, "sha256": own_sha256, "weight": 0.0, "follower": True}
        try:
            started = time.monotonic()
            control = self.averager.step(
                weight=0.0,
                gather=gather,
                timeout=ROUND_PATIENCE * self._round_timeout_s,
                allow_retries=True,
                wait=False,
            )
            gathered = await_round_group(
                control,
                started + self._round_timeout_s,
                started + ROUND_PATIENCE * self._round_timeout_s + self._averaging_timeout_s + 5,
                lambda: others_may_still_meet(
                    round_, self.exchange, self.tracker, self._request_timeout_s
                ),
            )
        except (Exception, BaseException) as e:  # any failure of the round alike
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            self._catch_up(round_ + 1, f"round {round_} failed: {failure_reason(e)}")
            return
        group = gathered if isinstance(gathered, dict) else {}
        canonical = canonical_sha256(group.values())
        if canonical is not None and canonical != own_sha256:
            self.stats.disagreed += 1
            volunteers = [
                v for v in group.values() if isinstance(v, dict) and not v.get("follower")
            ]
            if any(v.get("serves") for v in volunteers):
                # The round before met in two groups, and the volunteers' most held
                # other parameters than ours: the nodes keep theirs (canonical_sha256), so
                # we take theirs, or the keeper would hold a round nobody trains on. The
                # next round's state is checked as every download is.
                self._catch_up(
                    round_ + 1,
                    f"round {round_}: the group's most held global-parameter hash is "
                    f"{canonical[:16]}, ours {own_sha256[:16]}",
                )
                return
            # Nobody of the group serves state: ours is the one every peer can load, and
            # the nodes that hold others reload it (canonical_sha256).
            logger.warning(
                "round %d: the group's most held global-parameter hash is %s, ours %s; keeping ours",
                round_,
                canonical[:16],
                own_sha256[:16],
            )
        with torch.no_grad(), self.averager.get_tensors() as average, self._lock:
            outer_step(self.outer, self.global_params, average)
            self.round = round_ + 1
        self.stats.followed += 1
        self._announce()
        self._write(self.round)
        peers = [v for v in group.values() if isinstance(v, dict) and not v.get("follower")]
        logger.info(
            "followed round %d with %d peers; global parameters of round %d: %s; sent %.2f MB, "
            "received %.2f MB so far",
            round_,
            len(peers),
            self.round,
            self.global_sha256(),
            self.traffic.total_sent() / 1e6,
            sum(self.traffic.received(p) for p in self.traffic.counts()) / 1e6,
        )

    def _catch_up(self, round_: int, why: str) -> None:
        """Load round ``round_`` (or later) from a peer: we missed what led to it."""
        if not self.exchange.announced_rounds():
            # Nobody serves state (every node in client mode): waiting for the round would
            # only make us miss the next one too. Join the nodes' round now. (While a
            # volunteer serves, we wait for its state: ours must stay the swarm's.)
            self._jump(max(round_, self.tracker.global_progress.epoch), why)
            return
        state = self.exchange.await_round(round_, self._round_timeout_s)
        if state is None:
            self.stats.missed += 1
            self.stats.write(self.outbox)
            logger.warning("%s, and no peer serves round %d yet", why, round_)
            time.sleep(0.5)
            return
        with self._lock:
            for global_, loaded, momentum in zip(
                self.global_params, state.params, state.momentum, strict=True
            ):
                global_.copy_(loaded)
                self.outer.state[global_]["momentum_buffer"] = momentum.clone()
            self.round = state.round
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.round)
        self.stats.loaded += 1
        self.stats.loaded_to_start += int(self.stats.followed == 0)
        self._announce()
        self._write(self.round)
        logger.warning("%s: loaded round %d's global state from a peer", why, state.round)

    def _jump(self, round_: int, why: str) -> None:
        """Nobody serves round ``round_`` (every node is in client mode and the round
        failed for everyone: each applied its own pseudo-gradient). Waiting for it would
        stop the swarm for good, since its client-mode nodes need us as their reducer: go
        on at ``round_`` with the global parameters we hold. The next round's group then
        reloads ours (:func:`canonical_sha256`), so the nodes converge again."""
        held = self.round
        with self._lock:
            self.round = round_
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.round)
        self.stats.jumped += 1
        self.stats.round = self.round
        self.stats.write(self.outbox)
        self._announce()
        logger.warning(
            "%s, and no peer serves round %d: following from round %d with the global "
            "parameters of round %d; the next round's group reloads them",
            why,
            round_,
            round_,
            held,
        )

    # state

    def global_sha256(self) -> str:
        with self._lock:
            return params_sha256(self._state_dict())

    def _state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for param, global_ in zip(self._params, self.global_params, strict=True):
            for name in self._tied[str(id(param))]:
                state[name] = global_
        return state

    def _momentum(self) -> list[torch.Tensor]:
        return [
            self.outer.state.get(g, {}).get("momentum_buffer", torch.zeros_like(g))
            for g in self.global_params
        ]

    def _announce(self) -> None:
        self.averager.state_sharing_priority = self.round + FOLLOWER_BONUS

    def _current_state(self) -> tuple[dict[str, Any], list[torch.Tensor], None]:
        with self._lock:
            state = GlobalState(
                self.round,
                [g.clone() for g in self.global_params],
                [m.clone() for m in self._momentum()],
            )
        return served_state(state, self.round)

    def _write(self, round_: int) -> None:
        """Put round ``round_`` in the outbox (the keeper's checkpoint of it), unless we do
        not vouch for it (:meth:`_vouches`)."""
        with self._lock:
            state = {k: v.clone() for k, v in self._state_dict().items()}
            momentum = dict(zip(self.names, [m.clone() for m in self._momentum()], strict=True))
        self.stats.round = round_
        if self._vouches(state, round_):
            put_in_outbox(self.outbox, self.run_id, round_, state, momentum)
        else:
            self.stats.unvouched += 1
        self.stats.write(self.outbox)

    def _vouches(self, state: dict[str, torch.Tensor], round_: int) -> bool:
        """Whether round ``round_``'s global parameters may be checkpointed and served: not
        when their held-out loss is more than VOUCH_MARGIN above the last written round's.
        We follow every round's group and cannot judge its average (we have no
        pseudo-gradient of our own to compare it with, as nodes do); a group of one node
        flipping its parts made us apply them, and a node that had fallen behind loaded
        them from us, vouched for by the checkpoint. Such rounds are neither written nor
        served until a round comes back within the margin (or we load one that does)."""
        if self._judge is None or self._judge.heldout_loss is None:
            return True
        loss = self._judge.heldout_loss(state)
        if self._vouched_loss is not None and not loss <= self._vouched_loss + VOUCH_MARGIN:
            self.exchange.allow(False)
            logger.warning(
                "round %d: held-out loss %.3f, more than %.1f nats above the last written "
                "round's %.3f: not written, not served",
                round_,
                loss,
                VOUCH_MARGIN,
                self._vouched_loss,
            )
            return False
        self._vouched_loss = loss
        self.exchange.allow(True)
        return True

    def shutdown(self) -> None:
        self.tracker.shutdown(1.0)
        self.averager.shutdown()


def start_state(spec: RunSpec, checkpoint: Path | None, outer: Path | None) -> GlobalState:
    """Round 0 (the seeded model, no momentum) or a kept round's checkpoint and momentum."""
    model = seeded_model(spec)
    params = list(model.parameters())
    if checkpoint is None:
        return GlobalState(
            0, [p.detach().clone() for p in params], [torch.zeros_like(p) for p in params]
        )
    state, metadata = load_checkpoint(checkpoint)
    model.load_state_dict(state)
    momentum_state, _ = load_checkpoint(outer) if outer is not None else ({}, {})
    momentum = []
    for name, param in model.named_parameters():
        tensor = momentum_state.get(name)
        momentum.append(tensor.float() if tensor is not None else torch.zeros_like(param))
    return GlobalState(int(metadata["step"]), [p.detach().clone() for p in params], momentum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crowdtrain.node.swarm.follower",
        description="Follow a run's rounds (DiLoCo) or steps (sync) without training; "
        "write their state for the keeper.",
    )
    parser.add_argument("--spec", type=Path, required=True, help="the run spec (TOML)")
    parser.add_argument("--outbox", type=Path, required=True, help="where rounds are written")
    parser.add_argument(
        "--guard", type=Path, required=True, help="the guard's folder (roster.json, reports)"
    )
    parser.add_argument(
        "--snapshots", type=Path, help="where a sync run's private snapshots go (none: not kept)"
    )
    parser.add_argument("--initial-peers", nargs="+", required=True, help="DHT multiaddrs")
    parser.add_argument(
        "--heldout",
        type=Path,
        help="a validation shard: state a sync run's peers serve is judged on it",
    )
    parser.add_argument("--checkpoint", type=Path, help="start from this kept round")
    parser.add_argument("--outer", type=Path, help="that round's outer momentum")
    parser.add_argument("--host", default="127.0.0.1", help="address peers reach us at")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it is gone")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s follower %(levelname)s %(name)s: %(message)s"
    )
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    args.outbox.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    # Before anything that can hang (the DHT, the followers' hivemind objects, their
    # shutdown): whatever stops us, we are gone EXIT_GRACE_S later.
    threading.Thread(
        target=exit_deadline, args=(args.parent_pid, stop, EXIT_GRACE_S), daemon=True
    ).start()
    dht = hivemind.DHT(
        initial_peers=args.initial_peers,
        host_maddrs=[f"/ip4/{args.host}/tcp/0"],
        start=True,
    )
    follower: RoundFollower | StepFollower | None = None
    try:
        args.guard.mkdir(parents=True, exist_ok=True)
        if spec.optimizer.mode == "sync":
            follower = StepFollower(
                spec, dht, args.outbox, args.checkpoint, args.guard, args.snapshots, args.heldout
            )
        else:
            start = start_state(spec, args.checkpoint, args.outer)
            follower = RoundFollower(spec, dht, args.outbox, start, args.guard, args.heldout)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        logger.info(
            "following run %s (%s) from %s %d (pid %d)",
            spec.run.id,
            spec.optimizer.mode,
            "step" if spec.optimizer.mode == "sync" else "round",
            follower.stats.round,
            os.getpid(),
        )
        follower.run(stop)
    finally:
        if follower is not None:
            follower.shutdown()
        dht.shutdown()
        _stop_helpers()
    return 0


def _stop_helpers() -> None:
    """hivemind's helper processes (the DHT's and averagers' forks, p2pd) outlived a
    follower whose parent had died (nobody then stops its process group): as the group's
    leader (the keeper starts us so), stop every other member on the way out."""
    group = os.getpgrp()
    if group != os.getpid() or not os.path.isdir("/proc"):
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


# Nobody stops a follower whose coordinator died, and a clean exit can hang in hivemind's
# shutdown (a test run found one, with its p2p daemon, 12 minutes after its coordinator
# was killed; another, five followers two hours after theirs, asked to stop by the
# coordinator, which was then killed before it could kill them): this long after any
# stop, a follower ends itself and its helpers.
EXIT_GRACE_S = 30.0


def exit_deadline(parent_pid: int | None, stop: threading.Event, grace_s: float) -> None:
    """Set ``stop`` when the parent ``parent_pid`` is gone; ``grace_s`` after ``stop`` is
    set, for whatever reason, stop our helpers and exit (a clean exit ends the process,
    this thread with it, before)."""
    while not stop.wait(1.0):
        if parent_pid is not None and os.getppid() != parent_pid:
            logger.warning("the coordinator (pid %d) is gone: leaving", parent_pid)
            stop.set()
    time.sleep(grace_s)
    logger.warning("still here %.0f s after being asked to stop: exiting", grace_s)
    _stop_helpers()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
