"""``python -m lab`` (``make lab LAB_ARGS=...``): build the lab, run a scenario, tear it down.

Commands: ``check`` (can a lab run here), ``speed`` (measure each capped link with a
TCP stream), ``nat-round`` (the small DiLoCo scenario across a home NAT), ``scale``
(the link rate that keeps a real case's compute-to-transfer ratio), ``sweep`` (the
bandwidth sweep: 4 peers at three scaled link speeds, :mod:`lab.sweep`), ``cleanup``
(remove every lab's leftovers). Everything a command builds is removed when it ends,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path

from lab import nat_round, netns, scaling, speed, sweep, sweep_figures
from lab.network import HostSpec, Lab, Link

MBIT = 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="say whether a lab can run here")
    commands.add_parser("cleanup", help=f"remove every namespace named {netns.PREFIX}*")
    speed_parser = commands.add_parser("speed", help="measure each peer's capped links")
    speed_parser.add_argument("--peers", type=int, default=1, help="public peers")
    speed_parser.add_argument("--nat-peers", type=int, default=1, help="peers behind NAT")
    speed_parser.add_argument("--seconds", type=float, default=3.0, help="per stream")
    round_parser = commands.add_parser("nat-round", help=nat_round.__doc__.splitlines()[0])
    round_parser.add_argument("--timeout", type=float, default=150.0, help="seconds")
    for sub in (speed_parser, round_parser):
        sub.add_argument("--up-mbit", type=float, default=2.0, help="each peer's uplink cap")
        sub.add_argument("--down-mbit", type=float, default=8.0, help="each peer's downlink cap")
        sub.add_argument("--logs", type=Path, help="where logs go (default: a temporary folder)")
    sweep_parser = commands.add_parser("sweep", help=sweep.__doc__.splitlines()[0])
    sweep_parser.add_argument(
        "--modes", default="diloco", help="comma-separated: diloco, sync (default: diloco)"
    )
    sweep_parser.add_argument(
        "--real-mbit", default="10,50,200", help="the real uplinks the links stand for"
    )
    sweep_parser.add_argument("--window-s", type=float, default=75.0, help="measured per run")
    sweep_parser.add_argument(
        "--inner-steps",
        type=int,
        default=sweep.SweepConfig.inner_steps,
        help="DiLoCo's inner steps per round (its compute time per round)",
    )
    sweep_parser.add_argument(
        "--averaging-timeout-s", type=float, help="the run spec's (default: the tiny run's 10 s)"
    )
    sweep_parser.add_argument(
        "--calibration",
        type=Path,
        help="an earlier sweep.json of this machine: its peers' compute rates, no new calibration",
    )
    sweep_parser.add_argument("--out", type=Path, default=Path("lab/results"), help="figures")
    sweep_parser.add_argument(
        "--logs", type=Path, help="where logs go (default: a temporary folder)"
    )
    report_parser = commands.add_parser(
        "sweep-report", help="the tables and plot of a sweep's sweep.json, again"
    )
    report_parser.add_argument("sweep_json", type=Path, nargs="+", help="one or more, in order")
    report_parser.add_argument("--plot", type=Path, required=True, help="where the plot goes")
    scale_parser = commands.add_parser("scale", help=scaling.__doc__.splitlines()[0])
    scale_parser.add_argument("--params", type=float, required=True, help="our model's parameters")
    scale_parser.add_argument(
        "--compute-s", type=float, required=True, help="measured compute seconds per round"
    )
    scale_parser.add_argument("--bits", type=float, default=8, help="bits sent per parameter")
    args = parser.parse_args(argv)
    # Ctrl-C must end a lab even where it was started with SIGINT ignored (a background
    # job of a non-interactive shell): what it built comes down on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lab %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except netns.LabUnavailable as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted; everything it built is removed", file=sys.stderr)
        return 130


def check(args: argparse.Namespace) -> int:
    netns.require()
    with Lab([HostSpec("probe")], Path(tempfile.mkdtemp(prefix="crowdtrain-lab-"))) as lab:
        delay = "available" if lab.netem else "not available (no sch_netem): no delay is added"
    print(f"lab: ready (ip, tc, nft, namespaces); propagation delay {delay}")
    return 0


def cleanup(args: argparse.Namespace) -> int:
    removed = netns.cleanup()
    print(f"lab: removed {len(removed)} namespaces{': ' if removed else ''}{' '.join(removed)}")
    return 0


def run_speed(args: argparse.Namespace) -> int:
    link = Link(args.up_mbit * MBIT, args.down_mbit * MBIT)
    specs = [HostSpec("coordinator")]
    specs += [HostSpec(f"peer{i}", link) for i in range(1, args.peers + 1)]
    specs += [HostSpec(f"home{i}", link, behind_nat=True) for i in range(1, args.nat_peers + 1)]
    with Lab(specs, _logs(args)) as lab:
        _say_delay(lab)
        for spec in specs[1:]:
            for direction, cap in (("up", link.up_bps), ("down", link.down_bps)):
                got = speed.measure(lab, spec.name, "coordinator", direction, args.seconds)
                assert cap is not None
                print(
                    f"{spec.name:>8} {direction:>4}: {got.bps / MBIT:6.2f} Mbit/s of "
                    f"{cap / MBIT:g} ({got.bps / cap:.0%}), seen from {got.peer}",
                    flush=True,
                )
    return 0


def run_nat_round(args: argparse.Namespace) -> int:
    config = nat_round.NatRoundConfig(args.up_mbit * MBIT, args.down_mbit * MBIT, args.timeout)
    logs = _logs(args)
    with Lab(nat_round.hosts(config), logs) as lab:
        _say_delay(lab)
        result = nat_round.run(lab, logs, config)
    print(
        f"lab: round {result.round} averaged by both peers {result.peers_s:.0f} s after they "
        f"started; the NAT'd peer's uplink carried {result.home_uplink_bytes:,} bytes "
        f"(cap x time: {result.home_uplink_cap_bytes:,.0f}); logs in {logs}"
    )
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in sweep.SPECS]
    if unknown:
        print(f"lab: unknown mode {unknown[0]!r}: use {', '.join(sweep.SPECS)}", file=sys.stderr)
        return 2
    config = sweep.SweepConfig(
        modes=modes,
        real_uplinks_mbit=tuple(float(x) for x in args.real_mbit.split(",")),
        window_s=args.window_s,
        inner_steps=args.inner_steps,
        averaging_timeout_s=args.averaging_timeout_s,
    )
    logs = _logs(args)
    print(
        f"lab: sweep of {', '.join(modes)} at {args.real_mbit} Mbit/s; logs in {logs}", flush=True
    )
    rates = None
    if args.calibration is not None:
        rates = sweep.load(args.calibration)[0]["peer_tokens_per_s"]
    _, runs = sweep.run(logs, config, lambda line: print(f"lab: {line}", flush=True), rates)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text((logs / "sweep.json").read_text(), encoding="utf-8")
    _report(runs, args.out / "sweep_utilisation.png")
    print(f"lab: figures in {args.out}/sweep.json and {args.out}/sweep_utilisation.png")
    return 0


def sweep_report(args: argparse.Namespace) -> int:
    runs = [run for path in args.sweep_json for run in sweep.load(path)[1]]
    _report(runs, args.plot)
    return 0


def _report(runs: list[sweep_figures.RunFigures], plot: Path) -> None:
    """Print the sweep's tables (losses also at the fewest tokens a measured run reached)
    and draw its plot."""
    measured = [r.swarm_tokens for r in runs if r.real_uplink_mbit]
    print(sweep_figures.run_table(runs, at_tokens=min(measured) if measured else None))
    print()
    print(sweep_figures.bytes_table(runs))
    sweep.plot(runs, plot)


def scale(args: argparse.Namespace) -> int:
    real = scaling.CONSUMER_GPU
    rate = scaling.scaled_uplink_bps(args.params, args.compute_s, args.bits)
    print(
        f"real case: {real.num_params:.3g} parameters x {real.bits_per_param:g} bits over "
        f"{real.uplink_bps / MBIT:g} Mbit/s = {real.transfer_s_per_round:.0f} s per round, "
        f"compute {real.compute_s_per_round:.0f} s (ratio {real.compute_to_transfer:.2f})\n"
        f"lab uplink: {rate / MBIT:.3f} Mbit/s (scale x{rate / real.uplink_bps:.3g} of every "
        f"real rate) for {args.params:.3g} parameters and {args.compute_s:g} s compute per round"
    )
    return 0


def _logs(args: argparse.Namespace) -> Path:
    return args.logs or Path(tempfile.mkdtemp(prefix="crowdtrain-lab-"))


def _say_delay(lab: Lab) -> None:
    if not lab.netem:
        print("lab: no propagation delay (this kernel has no sch_netem); caps only", flush=True)


COMMANDS = {
    "check": check,
    "cleanup": cleanup,
    "speed": run_speed,
    "nat-round": run_nat_round,
    "scale": scale,
    "sweep": run_sweep,
    "sweep-report": sweep_report,
}
