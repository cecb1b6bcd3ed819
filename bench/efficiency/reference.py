"""The reference: plain ``hivemind.Optimizer`` (its defaults, or tuned), same model, batch and data.

``peer`` is one peer process: the run's GPT, one torch thread, micro-batches
of ``micro_batch_size`` sequences from its share of the prepared shards, and
``hivemind.Optimizer(target_batch_size=..., batch_size_per_step=...)`` with
everything else left at hivemind's defaults (AdamW with the spec's lr, betas
and weight decay), or with ``--tuned`` its timings set as the run spec's
``[swarm]`` sets ours (:func:`tuned_options`). Peer 0 writes its DHT addresses to a file the others join
through. Each peer appends its cumulative tokens to a JSON-lines file.
:func:`run_reference` starts the peers and measures tokens/s over a window.

    python -m bench.efficiency.reference peer --data D --spec S.json --index 0 --num-peers 2 \
        --peers-file F --out p0.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.efficiency.data import train_batches
from bench.efficiency.processes import helpers, module_env, python_module
from bench.efficiency.specs import gpt_config

RUN_ID = "plain-hivemind"


def tuned_options(spec: dict[str, Any]) -> dict[str, Any]:
    """hivemind.Optimizer's timings set as the run spec's [swarm] sets ours: what a user
    who tunes hivemind by hand would pass (the gradient averager's request timeout goes
    through its factory: averager_opts reach only the state averager)."""
    from hivemind.optim.grad_averager import GradientAverager

    swarm = spec.get("swarm", {})
    request_timeout = swarm.get("request_timeout_s", 1.0)
    return {
        "matchmaking_time": swarm.get("matchmaking_time_s", 3.0),
        "averaging_timeout": swarm.get("averaging_timeout_s", 10.0),
        "load_state_timeout": swarm.get("load_state_timeout_s", 60.0),
        "average_state_every": swarm.get("average_state_every", 100),
        "averager_opts": {"request_timeout": request_timeout},
        "grad_averager_factory": partial(GradientAverager, request_timeout=request_timeout),
    }


def peer(args: argparse.Namespace) -> int:
    # hivemind's averagers need fork (spawn cannot pickle their locks).
    mp.set_start_method("fork", force=True)
    import hivemind
    import torch

    from crowdtrain.model import GPT, param_groups

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec.read_text())
    opt, seq_len = spec["optimizer"], spec["model"]["seq_len"]
    micro = opt.get("micro_batch_size", 16)
    torch.manual_seed(spec["run"].get("seed", 0))
    model = GPT(gpt_config(spec)).to(args.device)

    initial_peers: list[str] = []
    if args.index > 0:
        deadline = time.monotonic() + 120
        while not args.peers_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        initial_peers = json.loads(args.peers_file.read_text())
    dht = hivemind.DHT(
        initial_peers=initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    if args.index == 0:
        tmp = args.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        tmp.replace(args.peers_file)
    optimizer = None
    stop = threading.Event()
    try:
        # Created in the main thread (its averager installs a signal handler);
        # client_mode passed explicitly: hivemind inverts it when left out.
        optimizer = hivemind.Optimizer(
            dht=dht,
            run_id=RUN_ID,
            target_batch_size=opt["target_batch_size"],
            batch_size_per_step=micro,
            optimizer=partial(
                torch.optim.AdamW,
                lr=opt.get("lr", 3e-3),
                betas=tuple(opt.get("betas", (0.9, 0.95))),
            ),
            params=param_groups(model, opt.get("weight_decay", 0.1)),
            client_mode=dht.client_mode,
            verbose=False,
            **(tuned_options(spec) if args.tuned else {}),
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        batches = train_batches(
            args.data, spec["run"].get("seed", 0), seq_len, micro, args.index, args.num_peers
        )
        num_tokens, last_write = 0, 0.0
        with open(args.out, "a") as out:
            while not stop.is_set():
                batch = torch.from_numpy(next(batches)).to(args.device)
                _, loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                num_tokens += batch.shape[0] * seq_len
                now = time.time()
                if now - last_write >= 1.0:
                    last_write = now
                    row = {"time": now, "num_tokens": num_tokens, "epoch": optimizer.local_epoch}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()
    return 0


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def tokens_at(rows: list[dict[str, Any]], wall_time: float) -> float:
    """Cumulative tokens at ``wall_time``, interpolated between written rows."""
    if not rows or wall_time <= rows[0]["time"]:
        return 0.0 if not rows else float(rows[0]["num_tokens"])
    for a, b in zip(rows, rows[1:], strict=False):
        if a["time"] <= wall_time <= b["time"]:
            frac = (wall_time - a["time"]) / max(b["time"] - a["time"], 1e-9)
            return a["num_tokens"] + frac * (b["num_tokens"] - a["num_tokens"])
    return float(rows[-1]["num_tokens"])


def run_reference(
    folder: Path,
    data: Path,
    spec_path: Path,
    num_peers: int,
    warmup_s: float,
    window_s: float,
    sampler: Any = None,
    device: str = "cpu",
    tuned: bool = False,
) -> dict[str, Any]:
    """Start ``num_peers`` plain-hivemind peers, measure each one's tokens/s over
    ``window_s`` after every peer trained and ``warmup_s`` passed, then stop them all."""
    folder.mkdir(parents=True, exist_ok=True)
    children = helpers(folder)
    peers_file = folder / "peers.json"
    outs = [folder / f"peer-{i}.jsonl" for i in range(num_peers)]
    try:
        for i in range(num_peers):
            child = children.spawn(
                f"hivemind-{i}",
                [
                    *python_module("reference"),
                    "peer",
                    "--data", str(data),
                    "--spec", str(spec_path),
                    "--index", str(i),
                    "--num-peers", str(num_peers),
                    "--peers-file", str(peers_file),
                    "--out", str(outs[i]),
                    "--device", device,
                    *(["--tuned"] if tuned else []),
                ],
                env=module_env({"HIVEMIND_LOGLEVEL": "WARNING"}),
            )  # fmt: skip
            if sampler is not None:
                sampler.add(f"hivemind-{i}", child.popen.pid)
        if sampler is not None:
            sampler.start()
        deadline = time.monotonic() + 180
        while not all(_read(o) for o in outs):
            dead = [c for c in children.processes if c.popen.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("plain-hivemind peers did not start training in 180 s")
            time.sleep(1)
        begin = max(_read(o)[0]["time"] for o in outs) + warmup_s
        end = begin + window_s
        while time.time() < end + 2:
            time.sleep(1)
        rows = [_read(o) for o in outs]
    finally:
        if sampler is not None:
            sampler.stop()
        children.stop_all(grace_s=30)
    per_peer = [(tokens_at(r, end) - tokens_at(r, begin)) / window_s for r in rows]
    epochs = [(r[-1]["epoch"] if r else 0) for r in rows]
    total_tokens = sum(r[-1]["num_tokens"] if r else 0 for r in rows)
    return {
        "num_peers": num_peers,
        "tuned": tuned,
        "warmup_s": warmup_s,
        "window_s": window_s,
        "tokens_per_s_per_peer": per_peer,
        "tokens_per_s": sum(per_peer),
        "final_epochs": epochs,
        "num_tokens": total_tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.efficiency.reference", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("peer")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--num-peers", type=int, required=True)
    p.add_argument("--peers-file", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tuned", action="store_true", help="timings as the run spec's [swarm]")
    args = parser.parse_args()
    return peer(args)


if __name__ == "__main__":
    sys.exit(main())
