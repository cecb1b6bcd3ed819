"""The efficiency bench's markdown table and plots, rebuilt from efficiency.json alone.

Each figure is a ratio with its goal, whether the goal is met, and the facts
from the same run that bear on it (what held it back). Plots: validation loss
against tokens for the baseline and both swarm modes, and bytes sent per peer
over time. Knows nothing about how the numbers were measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.efficiency import ROOT

HIVEMIND_DEFAULTS = (
    "hivemind 1.1.12's defaults: matchmaking_time 15 s, averaging_timeout 60 s, "
    "average_state_every 1, no compression"
)
HIVEMIND_TUNED = (
    "hivemind tuned with the run spec's [swarm] timings: matchmaking_time 3 s, "
    "averaging_timeout 10 s, average_state_every 100, request_timeout 1 s, no compression"
)


def _ok(run: Any) -> bool:
    return isinstance(run, dict) and "error" not in run


def _why(run: Any) -> str:
    if isinstance(run, dict) and "error" in run:
        return str(run["error"]).splitlines()[-1][:300]
    return "not run"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


class Row:
    def __init__(self, figure: str, goal: str) -> None:
        self.figure, self.goal = figure, goal
        self.value, self.met, self.notes = "n/a", "not measured", ""

    def set(self, value: str, met: bool | None, notes: str = "") -> None:
        self.value = value
        self.met = "n/a" if met is None else ("**met**" if met else "**not met**")
        self.notes = notes

    def line(self) -> str:
        return f"| {self.figure} | {self.goal} | {self.value} | {self.met} | {self.notes} |"


def _loss_row(r: dict[str, Any], mode: str, limit: float) -> Row:
    row = Row(
        f"validation loss at equal tokens, 4 peers {mode} / one process",
        f"within {100 * (limit - 1):.0f}% (ratio <= {limit:.2f})",
    )
    run, base = r.get("loss", {}).get(mode), r.get("baseline")
    if not _ok(run):
        row.notes = _why(run)
        return row
    if not _ok(base):
        row.notes = "baseline: " + _why(base)
        return row
    losses = [n["val_loss"] for n in run["nodes"].values() if "val_loss" in n]
    step = base.get("steps_for", {}).get(mode)
    base_loss = base.get("final", {}).get(str(step))
    if not losses or base_loss is None:
        row.notes = (
            "no checkpoint to evaluate" if not losses else "baseline has no evaluation there"
        )
        return row
    ratio = statistics.mean(losses) / base_loss
    tokens = run["swarm_tokens"]
    notes = [
        f"{statistics.mean(losses):.3f} vs {base_loss:.3f} nats on {base['num_val_sequences']} "
        f"val sequences at {tokens / 1e6:.2f}M tokens (baseline step {step}, batch "
        f"{base['global_batch']}, {base['threads']} threads); peers {min(losses):.3f}-{max(losses):.3f}"
    ]
    if mode == "sync" and run.get("final_step"):
        per_step = run["tokens_trained"] / run["final_step"] / 128
        notes.append(
            f"the swarm took {run['final_step']} steps for those tokens: {per_step:.0f} sequences "
            "per step against 64 (target_batch_size is a minimum; steps overshoot)"
        )
    last_step = max((e["step"] for e in run.get("evals", [])), default=None)
    own = [e["val_loss"] for e in run.get("evals", []) if e["step"] == last_step]
    if own:
        notes.append(
            f"the nodes' own last evaluations (step {last_step}, their live parameters, "
            f"the spec's eval sequences): {statistics.mean(own):.3f}"
        )
    if mode == "diloco":
        notes.append(
            f"{run['rounds']} rounds; tokens "
            + ("from the nodes' round lines" if run.get("swarm_tokens_measured") else "nominal")
        )
    if run.get("note"):
        notes.append(run["note"])
    row.set(f"{ratio:.3f}", ratio <= limit, "; ".join(notes))
    return row


def _throughput_row(r: dict[str, Any], mode: str, goal: float) -> Row:
    row = Row(
        f"tokens/s of a peer in a 2-peer {mode} swarm / alone, no averaging (1 thread)",
        f">= {goal:.2f}",
    )
    run, solo = r.get("throughput", {}).get(mode), r.get("solo", {}).get(mode)
    if not _ok(run) or not solo:
        row.notes = _why(run) if not _ok(run) else "solo not measured"
        return row
    rates = [p["tokens_per_s"] for p in run["peers"].values()]
    ratio = statistics.mean(rates) / solo["tokens_per_s"]
    notes = (
        f"peers {', '.join(f'{x:,.0f}' for x in rates)} tok/s against {solo['tokens_per_s']:,.0f} "
        f"alone (a plain loop: micro-batch {solo['micro_batch']}, AdamW step every "
        f"{solo['step_every']}); {run['window_s']:.0f} s window, swarm steps "
        f"{run['steps'][0]}->{run['steps'][1]}; the 2 peers' averaging processes share the 2 cores"
    )
    row.set(f"{ratio:.3f}", ratio >= goal, notes)
    return row


def _uplink_per_million(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """Mean bytes per peer per million swarm tokens: everything on its uplink, and the part
    to the coordinator's processes (gRPC, HTTP, its DHT peer, the keeper's follower)."""
    tokens = run.get("swarm_tokens")
    peers = list(run.get("bytes", {}).values())
    if not tokens or not peers:
        return None, None
    total = statistics.mean(v["swarm"] + v["control"] for v in peers) / (tokens / 1e6)
    control = statistics.mean(v["control"] for v in peers) / (tokens / 1e6)
    return total, control


_LABELS = {
    "diloco": "H=100, 8-bit",
    "diloco-topk-2bit": "H=100, top-1/64 2-bit, error feedback",
    "diloco-4bit": "H=100, 4-bit, error feedback",
}


def _bytes_row(r: dict[str, Any], mode: str = "diloco", goal: float = 100.0) -> Row:
    label = _LABELS.get(mode, mode)
    row = Row(
        "bytes on each peer's uplink per million swarm tokens, everything counted: sync "
        f"(fp32 gradients every step) / diloco ({label})",
        f">= {goal:g}x fewer for diloco",
    )
    sync, diloco = r.get("loss", {}).get("sync"), r.get("loss", {}).get(mode)
    if not _ok(sync) or not _ok(diloco):
        row.notes = _why(sync if not _ok(sync) else diloco)
        return row
    s, s_control = _uplink_per_million(sync)
    d, d_control = _uplink_per_million(diloco)
    if not s or not d:
        row.notes = "no bytes counted"
        return row
    notes = (
        f"{s / 1e6:,.1f} MB vs {d / 1e6:,.2f} MB per peer per million tokens (4 peers; kernel "
        f"TCP counters of each node's process tree, p2pd included: to other peers and to the "
        f"coordinator's processes, its round follower among them); of which to the "
        f"coordinator's processes {(s_control or 0) / 1e6:,.2f} MB and {(d_control or 0) / 1e6:,.2f} MB"
    )
    row.set(f"{s / d:,.0f}x", s / d >= goal, notes)
    return row


def _compression_loss_row(r: dict[str, Any], mode: str) -> Row:
    row = Row(
        f"validation loss at equal tokens, 4 peers diloco: {_LABELS.get(mode, mode)} / 8-bit "
        "pseudo-gradients",
        "within 2% (ratio <= 1.02)",
    )
    loss = r.get("loss", {})
    base, topk = loss.get("diloco"), loss.get(mode)
    if not _ok(base) or not _ok(topk):
        row.notes = _why(base if not _ok(base) else topk)
        return row
    a = [n["val_loss"] for n in base["nodes"].values() if "val_loss" in n]
    b = [n["val_loss"] for n in topk["nodes"].values() if "val_loss" in n]
    if not a or not b:
        row.notes = "no checkpoint to evaluate"
        return row
    ratio = statistics.mean(b) / statistics.mean(a)
    row.set(
        f"{ratio:.3f}",
        ratio <= 1.02,
        f"{statistics.mean(b):.3f} vs {statistics.mean(a):.3f} nats at "
        f"{topk['swarm_tokens'] / 1e6:.2f}M vs {base['swarm_tokens'] / 1e6:.2f}M swarm tokens "
        f"({topk['rounds']} rounds each)",
    )
    return row


def _hivemind_row(r: dict[str, Any], mode: str, goal: float, tuned: bool = False) -> Row:
    which = "tuned as our spec (same swarm timings)" if tuned else "its defaults"
    row = Row(f"tokens/s, 2-peer {mode} swarm / plain hivemind.Optimizer, {which}", f">= {goal:g}x")
    ours, ref = r.get("throughput", {}).get(mode), r.get("hivemind")
    if tuned and isinstance(ref, dict):
        ref = ref.get("tuned")
    if not _ok(ours) or not _ok(ref):
        row.notes = _why(ours if not _ok(ours) else ref)
        return row
    ratio = ours["tokens_per_s"] / ref["tokens_per_s"] if ref["tokens_per_s"] else None
    notes = (
        f"{ours['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f} tok/s for the swarm "
        f"({HIVEMIND_TUNED if tuned else HIVEMIND_DEFAULTS}; same model, micro-batch 16, "
        f"target batch 64, 1 thread per peer; "
        f"{ref['window_s']:.0f} s window after {ref['warmup_s']:.0f} s)"
    )
    row.set(_fmt(ratio) + "x", ratio is not None and ratio >= goal, notes)
    return row


def _late_row(r: dict[str, Any]) -> Row:
    row = Row("late joiner: process start to first contributing step, ~10M parameters", "< 10 s")
    late = r.get("late_joiner")
    if not _ok(late):
        row.notes = _why(late)
        return row
    secs = late.get("seconds")
    notes = [
        f"{late['mode']} run of {late['num_parameters'] / 1e6:.1f}M parameters at step "
        f"{late['step_at_join']} when it joined"
        + (
            f" (inner_steps {late['inner_steps']} so a round ends in about a minute)"
            if late.get("inner_steps")
            else ""
        )
        + "; 2 peers already training on the 2 cores"
    ]
    if late.get("timeline_s"):
        notes.append(
            "after its Popen: " + ", ".join(f"{k} {v:.1f} s" for k, v in late["timeline_s"].items())
        )
    if secs is None:
        notes.append("no 'first contributing step' line in the joiner's log")
    row.set(_fmt(secs, 1) + " s", None if secs is None else secs < 10, "; ".join(notes))
    return row


def _restart_row(r: dict[str, Any]) -> Row:
    row = Row(
        "a node restarted after SIGKILL: process start to first contributing step, ~10M parameters",
        "< 10 s",
    )
    late = r.get("late_joiner")
    restart = late.get("restart") if isinstance(late, dict) else None
    if not _ok(late) or not isinstance(restart, dict):
        row.notes = _why(late) if not _ok(late) else "not measured"
        return row
    secs = restart.get("seconds")
    notes = ["node-b of the late joiner's run, killed with its hivemind helpers, same home"]
    if restart.get("timeline_s"):
        notes.append(
            "after its Popen: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in restart["timeline_s"].items())
        )
    if restart.get("started_from"):
        notes.append(restart["started_from"].split(": ", 1)[-1][:160])
    row.set(_fmt(secs, 1) + " s", None if secs is None else secs < 10, "; ".join(notes))
    return row


def _half_row(r: dict[str, Any]) -> Row:
    row = Row(
        "a node at half speed in a 2-peer diloco swarm: its share of samples / its share of compute",
        "within 10%",
    )
    half = r.get("half_speed")
    if not _ok(half):
        row.notes = _why(half)
        return row
    samples, compute = half.get("sample_share"), half.get("compute", {}).get("share")
    if samples is None or not compute:
        row.notes = "no samples counted"
        return row
    off = samples / compute - 1
    acknowledged = half.get("throttle_acknowledged", {}).get("node-b")
    notes = (
        f"{samples:.3f} of the samples against {compute:.3f} of the compute (speeds alone, side by "
        f"side: {half['compute']['tokens_per_s_full']:,.0f} and "
        f"{half['compute']['tokens_per_s_half']:,.0f} tok/s; in the swarm "
        f"{half['peers']['node-a']['tokens_per_s']:,.0f} and "
        f"{half['peers']['node-b']['tokens_per_s']:,.0f}); {half['window_s']:.0f} s window"
        + ("" if acknowledged else "; the throttled node did not log its test hook")
    )
    row.set(f"{off:+.1%}", abs(off) <= 0.10, notes)
    return row


def _robust_row(r: dict[str, Any]) -> Row:
    row = Row(
        "tokens/s of a 3-peer sync swarm, aggregation = centered_clip / mean (no attacker)",
        ">= 0.95",
    )
    runs = r.get("robust", {})
    clip, mean = runs.get("centered_clip", []), runs.get("mean", [])
    if not clip or not mean or not all(_ok(x) for x in [*clip, *mean]):
        bad = next((x for x in [*clip, *mean] if not _ok(x)), None)
        row.notes = _why(bad) if bad is not None else "not run"
        return row
    rates = {k: [x["tokens_per_s"] for x in v] for k, v in (("clip", clip), ("mean", mean))}
    ratio = statistics.mean(rates["clip"]) / statistics.mean(rates["mean"])
    far = sum(
        count
        for run in clip
        for reasons in run.get("reports", {}).values()
        for reason, count in reasons.items()
        if reason == "far"
    )
    flagged = sorted({n for run in clip for n in run.get("flagged", [])})
    spans = ", ".join("{}->{}".format(*run["steps"]) for run in clip)
    notes = (
        f"{', '.join(f'{x:,.0f}' for x in rates['clip'])} vs "
        f"{', '.join(f'{x:,.0f}' for x in rates['mean'])} tok/s for the swarm, runs alternated "
        f"(mean first), {clip[0]['window_s']:.0f} s windows, steps "
        f"{spans} under CenteredClip; "
        f"3 peers and the keeper's follower share the 2 cores"
    )
    if all("reports" in run for run in clip):
        notes += (
            f"; honest parts reported far under CenteredClip: {far}, peers flagged: "
            f"{', '.join(flagged) or 'none'}"
        )
    row.set(f"{ratio:.3f}", ratio >= 0.95, notes)
    return row


def rows(r: dict[str, Any]) -> list[Row]:
    makers = [
        (_loss_row, ("diloco", 1.03)),
        (_loss_row, ("sync", 1.02)),
        (_throughput_row, ("diloco", 0.95)),
        (_throughput_row, ("sync", 0.85)),
        (_bytes_row, ()),
        (_bytes_row, ("diloco-topk-2bit", 146.0)),
        (_compression_loss_row, ("diloco-topk-2bit",)),
        (_bytes_row, ("diloco-4bit", 146.0)),
        (_compression_loss_row, ("diloco-4bit",)),
        (_hivemind_row, ("sync", 1.5)),
        (_hivemind_row, ("diloco", 2.0)),
        (_hivemind_row, ("sync", 1.5, True)),
        (_hivemind_row, ("diloco", 2.0, True)),
        (_late_row, ()),
        (_restart_row, ()),
        (_half_row, ()),
        (_robust_row, ()),
    ]
    out = []
    for make, extra in makers:
        try:
            out.append(make(r, *extra))
        except Exception as e:  # a malformed part must not cost the other rows
            row = Row(f"{make.__name__.strip('_')} {' '.join(map(str, extra))}", "")
            row.notes = f"could not report: {type(e).__name__}: {e}"
            out.append(row)
    return out


def _details(r: dict[str, Any]) -> list[str]:
    lines = []
    busy = [
        f"{part} {value['foreign_cpu_share']:.0%}"
        for part, value in r.items()
        if isinstance(value, dict) and (value.get("foreign_cpu_share") or 0) > 0.05
    ]
    if busy:
        lines.append(
            "**The machine was not the bench's alone**: other processes used this share of its "
            f"CPU during these parts, and their figures are skewed: {', '.join(busy)}."
        )
    solo, base = r.get("solo", {}), r.get("baseline")
    alone = [(m, solo[m]) for m in ("sync", "diloco") if isinstance(solo.get(m), dict)]
    if alone:
        lines.append(
            "Alone, one thread: "
            + ", ".join(f"{m} loop {v['tokens_per_s']:,.0f} tok/s" for m, v in alone)
            + "."
        )
    if _ok(base):
        lines.append(
            f"Baseline: one process, {base['threads']} threads, batch {base['global_batch']} "
            f"(micro-batches of {base['micro_batch']}), {base['tokens_per_s']:,.0f} tok/s, "
            f"{base['num_steps']} steps."
        )
    for mode in r.get("loss", {}):
        run = r.get("loss", {}).get(mode)
        if _ok(run) and run.get("duration_s"):
            lines.append(
                f"4-peer {mode}: {run.get('tokens_trained', 0) / 1e6:.2f}M tokens in "
                f"{run['duration_s']:.0f} s from the coordinator's start to the nodes' stop "
                f"({run['tokens_trained'] / run['duration_s']:,.0f} tok/s for the swarm, start-up "
                f"included), step {run.get('final_step')}."
            )
    ref = r.get("hivemind")
    if _ok(ref) and ref.get("bytes") and ref.get("num_tokens"):
        sent = statistics.mean(v["swarm"] for v in ref["bytes"].values())
        lines.append(
            f"Plain hivemind, 2 peers: {ref['tokens_per_s']:,.0f} tok/s, "
            f"{sent / (ref['num_tokens'] / 1e6) / 1e6:,.0f} MB sent per peer per million tokens."
        )
    return lines


def plot(r: dict[str, Any], folder: Path) -> list[str]:
    """Write the loss and bytes plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = r.get("baseline")
    if _ok(base):
        ax.plot(
            [p["num_tokens"] / 1e6 for p in base["curve"]],
            [p["loss"] for p in base["curve"]],
            label=f"one process ({base['threads']} threads)",
            color="black",
        )
    for mode, color in (("sync", "tab:blue"), ("diloco", "tab:orange")):
        run = r.get("loss", {}).get(mode)
        if not _ok(run):
            continue
        by_step: dict[int, list[tuple[float, float]]] = {}
        for e in run.get("evals", []):
            if e.get("swarm_tokens") is not None and e.get("val_loss") is not None:
                by_step.setdefault(e["step"], []).append((e["swarm_tokens"], e["val_loss"]))
        points = sorted(
            (statistics.mean(t for t, _ in v), statistics.mean(x for _, x in v))
            for v in by_step.values()
        )
        if points:
            ax.plot(
                [t / 1e6 for t, _ in points], [x for _, x in points],
                marker=".", color=color, label=f"4 peers {mode} (nodes' evaluations)",
            )  # fmt: skip
        losses = [n["val_loss"] for n in run["nodes"].values() if "val_loss" in n]
        if losses:
            ax.scatter(
                [run["swarm_tokens"] / 1e6], [statistics.mean(losses)], color=color, marker="*",
                s=120, zorder=5, label=f"{mode}, final (equal-token comparison)",
            )  # fmt: skip
    ax.set_xlabel("tokens trained by the swarm (millions)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Tiny GPT on the stdlib corpus, global batch 64")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "efficiency_loss.png", dpi=110)
    plt.close(fig)
    made.append("efficiency_loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, color in (("sync", "tab:blue"), ("diloco", "tab:orange")):
        run = r.get("loss", {}).get(mode)
        if not _ok(run) or not run.get("raw", {}).get("bytes"):
            continue
        series = run["raw"]["bytes"]
        ax.plot(
            [s["t"] for s in series],
            [max(0.01, statistics.mean(v[0] for v in s["peers"].values()) / 1e6) for s in series],
            color=color, label=f"4 peers {mode}",
        )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the coordinator started")
    ax.set_ylabel("MB sent per peer (mean)")
    ax.set_title("Bytes each peer sent to the swarm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "efficiency_bytes.png", dpi=110)
    plt.close(fig)
    made.append("efficiency_bytes.png")
    return made


def write_report(r: dict[str, Any], out: Path) -> None:
    """efficiency.md (goal, figure, met or not, and why) and the two plots beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = r.get("meta", {})
    specs = meta.get("specs", {})
    lines = [
        f"`{meta.get('command', 'python -m bench.efficiency')}` at commit {meta.get('commit', '?')}, "
        f"{meta.get('date', '?')}"
        + (" (**--quick**: shortened, not the issue's figures)" if meta.get("quick") else "")
        + ".",
        "",
        f"Every peer is a real process on loopback with one torch thread; specs: sync "
        f"{specs.get('sync', '?')}, diloco {specs.get('diloco', '?')}. The one-process baseline uses "
        "2 threads (the 4 peers' threads together, capped at this machine's 2 cores) and the "
        "nodes' init seed, AdamW settings and shards. Losses are evaluated on the first "
        "validation-shard sequences, the same for every model.",
        "",
        "| figure | goal | measured | goal met | what it rests on, what holds it back |",
        "| --- | --- | ---: | --- | --- |",
        *[row.line() for row in rows(r)],
        "",
        *_details(r),
        "",
    ]
    try:
        for name in plot(r, out.parent):
            # Linked from the repository's root: BENCHMARKS.md includes this file.
            path = out.parent / name
            link = path.relative_to(ROOT) if path.is_relative_to(ROOT) else name
            lines.append(f"![{name}]({link})")
            lines.append("")
    except Exception as e:  # a plot must never cost the table
        lines.append(f"(plots failed: {e})")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
