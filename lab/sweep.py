"""Scenario 1 of issue 16, the bandwidth sweep: 4 public peers train the tiny run on
capped links, at three link speeds that stand for real 10, 50 and 200 Mbit/s uplinks.

First a calibration run on uncapped links whose DiLoCo rounds never end: every peer
only computes, so it gives each peer's compute rate (tokens/s, on this machine's
cores shared by all of them) and the compute time of one real round of the measured
spec. :func:`lab.scaling.scaled_uplink_bps` turns that time into the lab's 50 Mbit/s
uplink, and every real rate is scaled by the same factor; downlinks are
``down_ratio`` times their uplink. Then one run per mode and speed: a coordinator
(its keeper's follower included) on the coordinator host, the peers on theirs, each
started by :class:`lab.nat_round.LabSwarm` as a user starts them. Once every peer has
made its first contributing step and ``warmup_s`` passed, the window opens: the
coordinator's peers view is read at its two ends (:mod:`lab.sweep_figures` turns the
two reads, the nodes' logs and the evaluations into the figures).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lab import scaling, shaping
from lab.nat_round import COORDINATOR, DILOCO, LabSwarm
from lab.network import HostSpec, Lab, Link
from lab.sweep_figures import RunFigures, Snapshot, peer_figures, window_counts
from tests.specs import TINY, write_tiny_spec
from tests.swarm import Swarm

logger = logging.getLogger(__name__)

RUN_ID = "tiny"
# A calibration round never ends: no peer averages, so every peer only computes.
CALIBRATION = {"optimizer": {**DILOCO["optimizer"], "inner_steps": 1_000_000}}
SPECS: dict[str, dict[str, Any]] = {
    # nat-round's DiLoCo: rounds of 20 inner steps, 8-bit pseudo-gradients.
    "diloco": DILOCO,
    # The tiny run's sync mode: a step every 32 sequences of the swarm, fp32 gradients.
    "sync": {},
}


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep runs: modes, the real uplinks it stands for (Mbit/s), peers, and
    how long each run's window lasts."""

    modes: tuple[str, ...] = ("diloco",)
    real_uplinks_mbit: tuple[float, ...] = (10.0, 50.0, 200.0)
    down_ratio: float = 4.0
    num_peers: int = 4
    window_s: float = 75.0
    inner_steps: int = DILOCO["optimizer"]["inner_steps"]  # DiLoCo's: a round's length
    averaging_timeout_s: float | None = None  # [swarm] averaging_timeout_s; None: the tiny run's
    calibration_s: float = 40.0
    warmup_s: float = 10.0
    join_timeout_s: float = 150.0


@dataclass(frozen=True)
class Calibration:
    """Each peer's compute rate (tokens/s), and what one measured DiLoCo round costs."""

    peer_tokens_per_s: dict[str, float]
    swarm_sequences_per_s: float
    round_sequences: int  # what the swarm trains per round: inner_steps x target batch
    num_params: int
    bits_per_param: float

    @property
    def round_compute_s(self) -> float:
        return self.round_sequences / self.swarm_sequences_per_s

    @property
    def uplink_50_bps(self) -> float:
        """The lab uplink that stands for the real case's (50 Mbit/s)."""
        return scaling.scaled_uplink_bps(self.num_params, self.round_compute_s, self.bits_per_param)

    def lab_uplink_bps(self, real_mbit: float) -> float:
        return self.uplink_50_bps * real_mbit * 1e6 / scaling.CONSUMER_GPU.uplink_bps


def spec(mode: str, config: SweepConfig) -> dict[str, Any]:
    """The spec sections of ``mode``'s runs (DiLoCo's rounds ``config.inner_steps`` long)."""
    sections = dict(SPECS[mode])
    if mode == "diloco":
        sections["optimizer"] = {**DILOCO["optimizer"], "inner_steps": config.inner_steps}
    if config.averaging_timeout_s is not None:
        sections["swarm"] = {"averaging_timeout_s": config.averaging_timeout_s}
    return sections


def series(mode: str, config: SweepConfig) -> str:
    """A run's name less its speed: the mode, DiLoCo's round length and the averaging
    timeout where they are not the default (``diloco-r100``, ``diloco-r100-t60``)."""
    name = mode
    if mode == "diloco" and config.inner_steps != SweepConfig.inner_steps:
        name += f"-r{config.inner_steps}"
    if config.averaging_timeout_s is not None:
        name += f"-t{config.averaging_timeout_s:g}"
    return name


def num_params() -> int:
    """The tiny run's parameters (what a pseudo-gradient carries, one per parameter)."""
    from crowdtrain.model.gpt import GPT, GPTConfig  # torch: only where a sweep runs

    m = TINY["model"]
    config = GPTConfig(m["vocab_size"], m["seq_len"], m["num_layers"], m["num_heads"], m["d_model"])
    return sum(p.numel() for p in GPT(config).parameters())


def peer_names(num_peers: int) -> list[str]:
    return [f"node-{i}" for i in range(1, num_peers + 1)]


def hosts(num_peers: int, link: Link) -> list[HostSpec]:
    return [HostSpec(COORDINATOR)] + [HostSpec(f"peer{i}", link) for i in range(1, num_peers + 1)]


def placement(num_peers: int) -> dict[str, str]:
    return {"coordinator": COORDINATOR} | {
        name: f"peer{i}" for i, name in enumerate(peer_names(num_peers), start=1)
    }


def measure(
    root: Path,
    data: Path,
    name: str,
    mode: str,
    sections: dict[str, Any],
    link: Link,
    config: SweepConfig,
    window_s: float,
    rates: dict[str, float] | None,
    real_uplink_mbit: float | None,
) -> RunFigures:
    """One run on a lab of its own under ``root/name``; ``rates`` are the calibrated
    compute rates (None: this is the calibration)."""
    run_root = root / name
    run_root.mkdir(parents=True)
    names = peer_names(config.num_peers)
    with Lab(hosts(config.num_peers, link), run_root) as lab:
        swarm = LabSwarm(run_root, lab, placement(config.num_peers))
        try:
            spec = write_tiny_spec(run_root / "tiny.toml", **sections)
            published = swarm.publish(spec, data)
            if published.returncode != 0:
                raise RuntimeError(f"publishing {spec} failed: {published.stderr}")
            swarm.start_coordinator("--host", lab.host(COORDINATOR).address, "--insecure")
            if mode == "diloco":  # its keeper's follower is up once round 0 is kept
                swarm.wait_for(
                    lambda: swarm.get(f"/api/runs/{RUN_ID}/checkpoints"), 90, "the keeper"
                )
            nodes = [
                swarm.start_node(n, "--dht-host", lab.host(swarm.placement[n]).address)
                for n in names
            ]
            swarm.wait_for(
                lambda: all("first contributing step" in n.output() for n in nodes),
                config.join_timeout_s,
                "every peer's first contributing step",
            )
            time.sleep(config.warmup_s)
            wire_before = [_wire(lab, swarm.placement[n]) for n in names]
            before, offsets = _read(swarm), [len(n.output()) for n in nodes]
            time.sleep(window_s)
            after, logs = _read(swarm), [n.output() for n in nodes]
            wire_after = [_wire(lab, swarm.placement[n]) for n in names]
            run = swarm.get(f"/api/runs/{RUN_ID}")
            evals = swarm.get(f"/api/runs/{RUN_ID}/evals")
        finally:
            swarm.stop_all()
    peers = [
        peer_figures(
            n,
            before,
            after,
            rates.get(n) if rates else None,
            window_counts(log, start, len(log)),
            (up_after - up_before, down_after - down_before),
        )
        for n, log, start, (up_before, down_before), (up_after, down_after) in zip(
            names, logs, offsets, wire_before, wire_after, strict=True
        )
    ]
    return RunFigures(
        name=name,
        mode=mode,
        real_uplink_mbit=real_uplink_mbit,
        up_bps=link.up_bps,
        down_bps=link.down_bps,
        peers=peers,
        val_loss=run.get("val_loss"),
        val_step=run.get("val_step"),
        swarm_tokens=sum(p["num_tokens"] for p in after.peers.values()),
        evals=evals,
    )


def _wire(lab: Lab, host: str) -> tuple[int, int]:
    """Bytes ``host``'s uplink and downlink carried so far (0 where uncapped)."""
    spec = lab.host(host)
    up = shaping.sent_bytes(*spec.uplink) if spec.spec.link.up_bps else 0
    down = shaping.sent_bytes(*spec.downlink) if spec.spec.link.down_bps else 0
    return up, down


def _read(swarm: LabSwarm) -> Snapshot:
    at_s = time.monotonic()
    return Snapshot.of(at_s, swarm.get(f"/api/runs/{RUN_ID}/peers"))


def calibrate(root: Path, data: Path, config: SweepConfig) -> tuple[Calibration, RunFigures]:
    """The calibration run: uncapped links, rounds that never end."""
    figures = measure(
        root, data, "calibration", "diloco", CALIBRATION, Link(), config,
        config.calibration_s, None, None,
    )  # fmt: skip
    return calibrated({p.name: p.tokens_per_s for p in figures.peers}, config), figures


def calibrated(rates: dict[str, float], config: SweepConfig) -> Calibration:
    """The calibration of peers computing ``rates`` tokens/s, for ``config``'s rounds."""
    seq_len = TINY["model"]["seq_len"] - 1  # tokens counted per sequence: its targets
    return Calibration(
        peer_tokens_per_s=rates,
        swarm_sequences_per_s=sum(rates.values()) / seq_len,
        round_sequences=config.inner_steps * DILOCO["optimizer"]["target_batch_size"],
        num_params=num_params(),
        bits_per_param=8,
    )


def run(
    root: Path,
    config: SweepConfig,
    say: Callable[[str], None],
    rates: dict[str, float] | None = None,
) -> tuple[Calibration, list[RunFigures]]:
    """The calibration (or, given, the peers' calibrated ``rates`` of an earlier sweep on
    this machine), then a run per mode and speed; ``say`` gets a line per run. Writes
    ``root/sweep.json`` after every run (what was measured survives a stop)."""
    data = Swarm(root=root).prepare(16_384)  # on this host: the data is read from files
    started = time.monotonic()
    runs = []
    if rates is None:
        calibration, figures = calibrate(root, data, config)
        runs.append(figures)
    else:
        calibration = calibrated(rates, config)
    say(
        f"calibration: {calibration.swarm_sequences_per_s:.1f} sequences/s in all, "
        f"{' '.join(f'{r:.0f}' for r in calibration.peer_tokens_per_s.values())} tokens/s per "
        f"peer; a round of {calibration.round_sequences} sequences computes in "
        f"{calibration.round_compute_s:.1f} s; {calibration.num_params:,} parameters x 8 bits "
        f"-> the lab's 50 Mbit/s is {calibration.uplink_50_bps / 1e6:.3f} Mbit/s "
        f"({time.monotonic() - started:.0f} s)"
    )
    _save(root, calibration, runs)
    for mode in config.modes:
        for real in config.real_uplinks_mbit:
            up = calibration.lab_uplink_bps(real)
            link = Link(up, up * config.down_ratio)
            name = f"{series(mode, config)}-{real:g}"
            began = time.monotonic()
            try:
                figures = measure(
                    root, data, name, mode, spec(mode, config), link, config, config.window_s,
                    calibration.peer_tokens_per_s, real,
                )  # fmt: skip
            except (AssertionError, RuntimeError) as e:  # a run that never got going
                say(f"{name}: not measured: {str(e).splitlines()[0]} (logs in {root / name})")
                continue
            runs.append(figures)
            _save(root, calibration, runs)
            util = figures.utilisation or 0.0
            say(
                f"{name}: lab {up / 1e6:.3f}/{up * config.down_ratio / 1e6:.3f} Mbit/s, "
                f"utilisation {util:.0%} "
                f"({' '.join(f'{p.utilisation or 0:.0%}' for p in figures.peers)}), "
                f"{figures.tokens_per_s / len(figures.peers):.0f} tokens/s per peer, rounds "
                f"averaged {sum(p.rounds_averaged for p in figures.peers)} failed "
                f"{sum(p.rounds_failed for p in figures.peers)} (all peers), val loss "
                f"{figures.val_loss} ({time.monotonic() - began:.0f} s)"
            )
    return calibration, runs


def _save(root: Path, calibration: Calibration, runs: list[RunFigures]) -> None:
    saved = asdict(calibration) | {
        "round_compute_s": calibration.round_compute_s,
        "uplink_50_bps": calibration.uplink_50_bps,
    }
    out = {"calibration": saved, "runs": [asdict(r) for r in runs]}
    (root / "sweep.json").write_text(json.dumps(out, indent=1), encoding="utf-8")


def load(path: Path) -> tuple[dict[str, Any], list[RunFigures]]:
    """The calibration (as saved) and the runs of a ``sweep.json``."""
    from lab.sweep_figures import PeerFigures

    saved = json.loads(path.read_text(encoding="utf-8"))
    runs = [
        RunFigures(**{**r, "peers": [PeerFigures(**p) for p in r["peers"]]}) for r in saved["runs"]
    ]
    return saved["calibration"], runs


def _mean_share(run: RunFigures) -> float | None:
    shares = [p.computing_share for p in run.peers if p.computing_share is not None]
    return sum(shares) / len(shares) if shares else None


def plot(runs: list[RunFigures], path: Path) -> None:
    """Utilisation (mean over peers, and each peer) against the real uplink it stands for,
    a line per series of runs (:func:`series`), and a dotted one of the nodes' own count of
    their computing time where they reported it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.4))
    measured = [r for r in runs if r.real_uplink_mbit]
    names = list(dict.fromkeys(r.name.rsplit("-", 1)[0] for r in measured))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        points = [
            (r.real_uplink_mbit, r)
            for r in measured
            if r.real_uplink_mbit and r.name.rsplit("-", 1)[0] == name
        ]
        xs = [x for x, _ in points]
        ax.plot(xs, [100 * (r.utilisation or 0) for _, r in points], marker="o", color=color,
                label=f"{name}, mean of {len(points[0][1].peers)} peers")  # fmt: skip
        for x, r in points:
            ax.scatter([x] * len(r.peers),
                       [100 * (p.utilisation or 0) for p in r.peers],
                       color=color, alpha=0.35, s=14)  # fmt: skip
        own = [(x, _mean_share(r)) for x, r in points if _mean_share(r) is not None]
        if own:
            ax.plot([x for x, _ in own], [100 * (v or 0) for _, v in own], marker="x",
                    linestyle=":", color=color,
                    label=f"{name}, the nodes' own count of computing time")  # fmt: skip
    ax.axhline(90, color="gray", linestyle="--", linewidth=1, label="goal: 90% at 50 Mbit/s")
    ax.set_xscale("log")
    ax.set_xlabel("real uplink the lab's link stands for (Mbit/s; downlink 4x)")
    ax.set_ylabel("compute utilisation (%)")
    ax.set_title("Bandwidth sweep: 4 peers, tiny run, links scaled to a 1B model's rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
