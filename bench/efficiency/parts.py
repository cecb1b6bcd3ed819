"""The efficiency bench's parts: each runs real processes and returns its raw numbers.

:class:`Bench` runs one part per method (``part_solo`` ... ``part_half_speed``,
in ``PARTS`` order) and keeps every part's result in efficiency.json as soon
as it ends. Knows nothing about the report drawn from them (report.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.efficiency import ROOT
from bench.efficiency.data import (
    NUM_VAL_SEQUENCES,
    checkpoint_metadata,
    evaluate_checkpoint,
    val_sequences,
)
from bench.efficiency.node_logs import (
    FIRST_STEP,
    LOADED_STATE,
    THROTTLE,
    diloco_round_tokens,
    round_done,
    timeline,
)
from bench.efficiency.plan import Plan
from bench.efficiency.processes import BIN, helpers, module_env, python_module
from bench.efficiency.reference import run_reference
from bench.efficiency.specs import diloco_spec, gpt_config, sync_spec, with_overrides
from bench.efficiency.swarm import SwarmRun, spec_json
from bench.efficiency.traffic import ByteSampler

PARTS = (
    "solo",
    "throughput",
    "hivemind",
    "loss",
    "baseline",
    "late_joiner",
    "half_speed",
    "robust",
)
# The robust part: 3-peer sync swarms under each rule, alternated this many times.
ROBUST_RULES = ("mean", "centered_clip")
ROBUST_REPEATS = 2
# The loss part's swarms: diloco-KIND is diloco with pseudo_grad_compression KIND.
LOSS_MODES = ("sync", "diloco", "diloco-topk-2bit", "diloco-4bit")
# The late joiner's model: about 10.6M parameters.
LATE_JOINER_MODEL = {"d_model": 384, "num_layers": 6, "num_heads": 6}


class Bench:
    """Runs the parts and keeps their results in one JSON file."""

    def __init__(self, args: argparse.Namespace, plan: Plan, work: Path):
        self.args, self.plan, self.work = args, plan, work
        self.json_path = args.out.with_suffix(".json")
        self.results: dict[str, Any] = {}
        if self.json_path.exists():
            try:
                self.results = json.loads(self.json_path.read_text())
            except ValueError:
                self.results = {}
        self.data = work / "data"
        self.sync, sync_from = sync_spec()
        diloco, diloco_from = diloco_spec()
        if plan.inner_steps is not None:
            diloco = with_overrides(diloco, optimizer={"inner_steps": plan.inner_steps})
            diloco_from += f", inner_steps = {plan.inner_steps} (--quick)"
        self.diloco = diloco
        self.spec_sources = {"sync": sync_from, "diloco": diloco_from}
        self.has_diloco = importlib.util.find_spec("crowdtrain.node.swarm.diloco") is not None

    # bookkeeping

    def save(self, part: str, value: Any) -> None:
        self.results[part] = value
        self.results["meta"] = self.meta()
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.json_path)

    def meta(self) -> dict[str, Any]:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return {
            "command": " ".join(["python -m bench.efficiency", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit + ("+changes" if dirty else ""),
            "quick": self.args.quick,
            "device": self.args.device,
            "plan": asdict(self.plan),
            "specs": self.spec_sources,
            "node_has_diloco": self.has_diloco,
        }

    def prepare(self) -> None:
        if (self.data / "manifest.json").exists():
            return
        result = subprocess.run(
            [str(BIN / "crowdtrain-coordinator"), "prepare-data", "--source", "stdlib",
             "--out", str(self.data)],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"prepare-data failed:\n{result.stderr[-3000:]}")

    def spec(self, mode: str, run_id: str, **overrides: dict[str, Any]) -> dict[str, Any]:
        base = self.sync if mode == "sync" else self.diloco
        return with_overrides(base, run={"id": run_id}, **overrides)

    def modes(self) -> list[str]:
        return ["sync", "diloco"] if self.has_diloco else ["sync"]

    def no_diloco(self) -> dict[str, Any]:
        return {
            "error": "not run: this crowdtrain's node has no diloco mode (crowdtrain.node.swarm.diloco)"
        }

    # parts

    def part_solo(self) -> dict[str, Any]:
        """One node-sized loop alone: micro-batches of 16, one thread, no averaging.
        Sync steps AdamW every target_batch/micro micro-batches, diloco every one."""
        out: dict[str, Any] = {}
        for mode in self.modes():
            spec = self.spec(mode, f"solo-{mode}")
            opt = spec["optimizer"]
            step_every = (
                1
                if mode == "diloco"
                else max(1, opt["target_batch_size"] // opt["micro_batch_size"])
            )
            out[mode] = self._train(
                "solo", spec, f"solo-{mode}", threads=1,
                extra=["--seconds", str(self.plan.solo_s), "--step-every", str(step_every)],
            )  # fmt: skip
        return out

    def _train(
        self, command: str, spec: dict[str, Any], name: str, threads: int, extra: list[str]
    ) -> dict[str, Any]:
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "result.json"
        args = [
            *python_module("baseline"), command,
            "--data", str(self.data), "--spec", str(spec_json(spec, folder / "spec.json")),
            "--threads", str(threads), "--device", self.args.device, "--out", str(out), *extra,
        ]  # fmt: skip
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())

    def part_throughput(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mode in ("sync", "diloco"):
            if mode == "diloco" and not self.has_diloco:
                out[mode] = self.no_diloco()
                continue
            window = self.plan.sync_window_s if mode == "sync" else self.plan.diloco_window_s
            try:
                out[mode] = self._window_run(mode, f"eff-{mode}-2", ["node-a", "node-b"], window)
            except Exception as e:  # one mode's failure must not hide the other's figure
                out[mode] = {"error": error_summary(e)}
        return out

    def _window_run(
        self,
        mode: str,
        run_id: str,
        names: list[str],
        window_s: float,
        node_env: dict[str, dict[str, str]] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Per-peer tokens/s and sequences over ``window_s`` after all peers train and a
        warm-up; ``overrides`` changes sections of the mode's spec."""
        swarm = SwarmRun(
            self.work / run_id, self.data, self.spec(mode, run_id, **(overrides or {})),
            self.args.device, node_env=node_env or {},
        )  # fmt: skip
        try:
            swarm.start(names)
            first = swarm.wait_for(
                lambda s: all(s.peers.get(n, {}).get("num_tokens", 0) > 0 for n in names), 240
            )
            if first is None:
                raise RuntimeError("the peers did not all train within 240 s")
            begin = swarm.wait_for(lambda s: s.t >= first.t + self.plan.warmup_s, 120)
            assert begin is not None
            # A diloco window holds at least one round's end, so its averaging is in the figure.
            rounds_needed = 1 if mode == "diloco" else 0
            end = swarm.wait_for(
                lambda s: s.t >= begin.t + window_s and s.step >= begin.step + rounds_needed,
                window_s + 300,
            )
            if end is None:
                raise RuntimeError(
                    f"no round ended within {window_s + 300:.0f} s of the window's start"
                )
            span = end.t - begin.t
            peers = {}
            for n in names:
                a, b = begin.peers[n], end.peers[n]
                peers[n] = {
                    "tokens_per_s": (b["num_tokens"] - a["num_tokens"]) / span,
                    "sequences": b["num_sequences"] - a["num_sequences"],
                }
            swarm.stop_nodes(grace_s=60)
            logs = {n: p.output() for n, p in swarm.nodes.items()}
            # What each node reported of the others' averaging parts (all honest here:
            # any report is a false positive), and who the coordinator flagged.
            reports: dict[str, dict[str, int]] = {}
            for n in names:
                path = self.work / run_id / n / "runs" / run_id / "guard" / "reports.jsonl"
                lines = path.read_text().splitlines() if path.exists() else []
                for line in lines:
                    reason = json.loads(line).get("reason", "?") if line.endswith("}") else "?"
                    reports.setdefault(n, {})[reason] = reports.get(n, {}).get(reason, 0) + 1
            return {
                "reports": reports,
                "flagged": sorted(n for n in names if end.peers.get(n, {}).get("flagged")),
                "run_id": run_id,
                "window_s": span,
                "steps": [begin.step, end.step],
                "peers": peers,
                "tokens_per_s": sum(p["tokens_per_s"] for p in peers.values()),
                "throttle_acknowledged": {n: THROTTLE in log for n, log in logs.items()},
                "raw": swarm.record(),
            }
        finally:
            swarm.shutdown()

    def part_robust(self) -> dict[str, Any]:
        """A 3-peer sync swarm under the weighted mean and under CenteredClip (with two
        peers every rule is the mean), alternated ROBUST_REPEATS times: what robust
        aggregation costs in tokens/s with no attacker."""
        out: dict[str, Any] = {rule: [] for rule in ROBUST_RULES}
        for repeat in range(ROBUST_REPEATS):
            for rule in ROBUST_RULES:
                run_id = f"eff-robust-{rule.replace('_', '-')}-{repeat}"
                try:
                    out[rule].append(
                        self._window_run(
                            "sync",
                            run_id,
                            ["node-a", "node-b", "node-c"],
                            self.plan.sync_window_s,
                            overrides={"trust": {"aggregation": rule}},
                        )
                    )
                except Exception as e:
                    out[rule].append({"error": error_summary(e)})
        return out

    def part_hivemind(self) -> dict[str, Any]:
        """Plain hivemind with its defaults; its tuned run is under ``"tuned"``."""
        result = self._hivemind(tuned=False)
        try:
            result["tuned"] = self._hivemind(tuned=True)
        except Exception as e:
            result["tuned"] = {"error": error_summary(e)}
        return result

    def _hivemind(self, tuned: bool) -> dict[str, Any]:
        spec = self.spec("sync", "plain-hivemind")
        folder = self.work / ("plain-hivemind-tuned" if tuned else "plain-hivemind")
        folder.mkdir(parents=True, exist_ok=True)
        sampler = ByteSampler(control_ports=set())
        result = run_reference(
            folder, self.data, spec_json(spec, folder / "spec.json"), 2,
            self.plan.hivemind_warmup_s, self.plan.hivemind_window_s, sampler=sampler,
            device=self.args.device, tuned=tuned,
        )  # fmt: skip
        result["bytes"] = sampler.totals()
        return result

    def part_loss(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.results.get("loss", {}))
        rounds = self.plan.rounds if self.args.rounds is None else self.args.rounds
        d = self.diloco["optimizer"]
        seq_len = self.diloco["model"]["seq_len"]
        round_sequences = d["inner_steps"] * d["target_batch_size"]
        modes = getattr(self.args, "loss_modes", ",".join(LOSS_MODES)).split(",")
        for mode in modes:
            if mode != "sync" and not self.has_diloco:
                out[mode] = self.no_diloco()
                continue
            try:
                out[mode] = self._loss_run(mode, rounds, round_sequences, seq_len)
            except Exception as e:
                out[mode] = {"error": error_summary(e)}
            self.save("loss", out)
        return out

    def _loss_run(
        self, mode: str, rounds: int, round_sequences: int, seq_len: int
    ) -> dict[str, Any]:
        run_id = f"eff-{mode}-4"
        names = ["node-a", "node-b", "node-c", "node-d"]
        if mode.startswith("diloco-"):  # the same run with other pseudo-gradients
            kind = mode.removeprefix("diloco-")
            spec = self.spec("diloco", run_id, optimizer={"pseudo_grad_compression": kind})
        else:
            spec = self.spec(mode, run_id)
        swarm = SwarmRun(self.work / run_id, self.data, spec, self.args.device)
        target_tokens = rounds * round_sequences * seq_len
        note = ""
        try:
            swarm.start(names)
            timeout_s = (
                self.plan.sync_loss_timeout_s if mode == "sync" else self.plan.loss_timeout_s
            )
            if mode == "sync":
                reached = swarm.wait_for(lambda s: s.num_tokens >= target_tokens, timeout_s)
            else:
                # A round's outer step lands when its averaging ends (in the background):
                # wait until every node logged round rounds-1 as averaged or recovered.
                marker = round_done(rounds - 1)
                reached = swarm.wait_for(
                    lambda s: all(marker.search(p.output()) for p in swarm.nodes.values()),
                    timeout_s,
                )
            if reached is None:
                note = (
                    f"stopped at the time limit ({timeout_s:.0f} s) short of "
                    f"{target_tokens / 1e6:.2f}M tokens"
                )
            swarm.stop_nodes(grace_s=90)
            evals = swarm.evals()
            for e in evals:
                e["swarm_tokens"] = swarm.tokens_at(e["time"]) if "time" in e else None
            sequences = val_sequences(self.data, seq_len, NUM_VAL_SEQUENCES)
            nodes = {}
            for n, proc in swarm.nodes.items():
                path = swarm.checkpoint(n)
                entry: dict[str, Any] = {"log_tail": proc.output()[-1500:]}
                if path.exists():
                    entry["metadata"] = checkpoint_metadata(path)
                    entry["val_loss"] = evaluate_checkpoint(path, spec, sequences, "cpu")
                nodes[n] = entry
            if mode == "sync":
                swarm_tokens = sum(
                    int(v.get("metadata", {}).get("num_tokens", 0)) for v in nodes.values()
                )
            else:
                swarm_tokens = diloco_round_tokens(swarm.nodes["node-a"].output(), rounds, seq_len)
            return {
                "run_id": run_id,
                "num_peers": len(names),
                "rounds": rounds,
                "target_tokens": target_tokens,
                "swarm_tokens": swarm_tokens or target_tokens,
                "swarm_tokens_measured": bool(swarm_tokens),
                "tokens_trained": swarm.latest().num_tokens if swarm.latest() else None,
                "final_step": swarm.latest().step if swarm.latest() else None,
                "duration_s": swarm.stopped_t,
                "nodes": nodes,
                "evals": evals,
                "bytes": swarm.bytes.totals() if swarm.bytes else {},
                "note": note,
                "raw": swarm.record(),
            }
        finally:
            swarm.shutdown()

    def part_baseline(self) -> dict[str, Any]:
        loss = self.results.get("loss", {})
        seq_len = self.sync["model"]["seq_len"]
        batch = self.sync["optimizer"]["target_batch_size"]
        steps = {
            mode: max(1, round(run["swarm_tokens"] / (batch * seq_len)))
            for mode, run in loss.items()
            if isinstance(run, dict) and "swarm_tokens" in run
        }
        if not steps:
            rounds = self.plan.rounds if self.args.rounds is None else self.args.rounds
            d = self.diloco["optimizer"]
            steps = {"diloco": rounds * d["inner_steps"] * d["target_batch_size"] // batch}
        threads = min(2, 4)  # the loss swarms' 4 peers have a thread each; this machine has 2 cores
        curve_every = max(1, max(steps.values()) // 40)
        result = self._train(
            "baseline", self.spec("sync", "baseline"), "baseline", threads=threads,
            extra=["--eval-steps", ",".join(str(s) for s in steps.values()),
                   "--curve-every", str(curve_every)],
        )  # fmt: skip
        result["steps_for"] = steps
        result["optimizer_differs"] = _optimizer_keys(self.sync) != _optimizer_keys(self.diloco)
        return result

    def part_late_joiner(self) -> dict[str, Any]:
        mode = "diloco" if self.has_diloco else "sync"
        overrides: dict[str, Any] = {"model": LATE_JOINER_MODEL}
        if mode == "diloco":
            # A 10M model trains ~5x slower: shorter rounds, so the run is under way in ~1 min.
            overrides["optimizer"] = {"inner_steps": self.plan.late_inner_steps}
        spec = self.spec(mode, "eff-late-joiner", **overrides)
        swarm = SwarmRun(self.work / "eff-late-joiner", self.data, spec, self.args.device)
        try:
            swarm.start(["node-a", "node-b"])
            under_way = swarm.wait_for(lambda s: s.step >= 1, self.plan.late_wait_s)
            step_at_join = swarm.latest().step if swarm.latest() else 0
            popen_at = time.time()
            joiner = swarm.add_node("node-c")
            found = None
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and found is None:
                found = FIRST_STEP.search(joiner.output())
                if joiner.popen.poll() is not None:
                    break
                time.sleep(0.5)
            log = joiner.output()
            loaded = LOADED_STATE.search(log)
            restart = self._restart_after_kill(swarm, "node-b")
            swarm.stop_nodes(grace_s=60)
            return {
                "restart": restart,
                "mode": mode,
                "num_parameters": _num_parameters(spec),
                "inner_steps": spec["optimizer"].get("inner_steps") if mode == "diloco" else None,
                "run_under_way": under_way is not None,
                "step_at_join": step_at_join,
                "seconds": float(found.group(1)) if found else None,
                "measured_by": "the node's 'first contributing step' log line" if found else None,
                "loaded_state": loaded.group(0) if loaded else None,
                "timeline_s": timeline(log, popen_at),
                "popen_at": popen_at,
                "log_tail": log[-2500:],
            }
        finally:
            swarm.shutdown()

    def _restart_after_kill(self, swarm: SwarmRun, name: str) -> dict[str, Any]:
        """SIGKILL a node (its hivemind helpers too) and start it again with the same home:
        seconds from the new process's start to its first contributing step."""
        assert swarm.swarm is not None
        swarm.swarm.kill(swarm.nodes[name])
        popen_at = time.time()
        again = swarm.add_node(name)
        found = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and found is None:
            found = FIRST_STEP.search(again.output())
            if again.popen.poll() is not None:
                break
            time.sleep(0.5)
        log = again.output()
        return {
            "seconds": float(found.group(1)) if found else None,
            "timeline_s": timeline(log, popen_at),
            "started_from": next(
                (line for line in log.splitlines() if "started from" in line or "loaded" in line),
                None,
            ),
            "log_tail": log[-2500:],
        }

    def part_half_speed(self) -> dict[str, Any]:
        if not self.has_diloco:
            return self.no_diloco()
        names = ["node-a", "node-b"]
        env = {"node-b": {"CROWDTRAIN_TEST_SLOWDOWN": "2"}}
        run = self._window_run("diloco", "eff-half-speed", names, self.plan.half_window_s, env)
        total = sum(p["sequences"] for p in run["peers"].values())
        run["sample_share"] = run["peers"]["node-b"]["sequences"] / total if total else None
        run["compute"] = self._compute_share()
        return run

    def _compute_share(self) -> dict[str, Any]:
        """The two nodes' speeds alone, measured side by side as they run (1 thread each,
        one throttled by the node's own hook)."""
        folder = self.work / "compute-share"
        folder.mkdir(parents=True, exist_ok=True)
        spec_path = spec_json(self.spec("diloco", "compute-share"), folder / "spec.json")
        children = helpers(folder)
        outs = {f: folder / f"slowdown-{f}.json" for f in (1, 2)}
        try:
            for factor, out in outs.items():
                children.spawn(f"solo-{factor}", [
                    *python_module("baseline"), "solo", "--data", str(self.data),
                    "--spec", str(spec_path), "--threads", "1", "--device", self.args.device,
                    "--seconds", str(self.plan.share_solo_s), "--slowdown", str(factor),
                    "--out", str(out),
                ], env=module_env())  # fmt: skip
            for child in children.processes:
                child.popen.wait(timeout=self.plan.share_solo_s + 120)
        finally:
            children.stop_all(grace_s=20)
        speeds = {f: json.loads(o.read_text())["tokens_per_s"] for f, o in outs.items()}
        return {
            "tokens_per_s_full": speeds[1],
            "tokens_per_s_half": speeds[2],
            "share": speeds[2] / (speeds[1] + speeds[2]),
        }


def _num_parameters(spec: dict[str, Any]) -> int:
    from crowdtrain.model import GPT

    return GPT(gpt_config(spec)).num_parameters()


def _optimizer_keys(spec: dict[str, Any]) -> tuple:
    o = spec["optimizer"]
    return tuple(o.get(k) for k in ("lr", "betas", "weight_decay", "warmup_steps", "grad_clip"))


def error_summary(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()[-3000:]
