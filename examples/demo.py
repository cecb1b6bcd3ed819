"""`make demo`: a coordinator and two nodes train one tiny GPT on loopback.

Runs the same command lines a user would: prepare-data, serve, publish and
two `crowdtrain-node join`. Shows each node's progress bar and, every few
seconds, the coordinator's view; stops everything it started after
DEMO_MINUTES (default 3) or on Ctrl-C, then says where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.runspec import load_spec
from crowdtrain.protocol.shards import load_manifest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_ID = "stdlib-tiny"  # the default spec's run; --spec picks another
NODES = ("node-a", "node-b")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Child:
    """A command in its own session whose latest output line is kept for display."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name = name
        self.log = log
        self.last_line = "starting..."
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        buffer = b""
        with open(self.log, "wb") as log:
            while chunk := self.popen.stdout.read1(4096):
                log.write(chunk)
                log.flush()
                buffer = (buffer + chunk)[-8192:]
                pieces = [p for p in re.split(rb"[\r\n]", buffer) if p.strip()]
                if pieces:
                    self.last_line = _ANSI.sub("", pieces[-1].decode(errors="replace")).strip()

    def stop(self, timeout: float) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers: DHT, averagers, p2pd
        except ProcessLookupError:
            pass
        self.popen.wait()


def run(*args: str) -> None:
    result = subprocess.run(args, text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"demo: `{' '.join(args)}` failed:\n{result.stderr.strip()}")
    print(result.stdout.strip())


def coordinator_view(url: str, run_id: str) -> list[str]:
    try:
        run_info = httpx.get(f"{url}/api/runs/{run_id}", timeout=5).json()
        peers = httpx.get(f"{url}/api/runs/{run_id}/peers", timeout=5).json()
    except (httpx.HTTPError, ValueError) as e:
        return [f"coordinator: unreachable ({e})"]
    val = run_info["val_loss"]
    first = run_info["first_val_loss"]
    lines = [
        f"coordinator | step {run_info['step']} | {run_info['num_tokens']:,} tokens | "
        f"{run_info['tokens_per_s']:,.0f} tok/s | val loss "
        + (f"{first:.3f} -> {val:.3f} nats" if val is not None else "-")
        + f" | {run_info['num_peers']} peers"
    ]
    for p in peers:
        loss = f"{p['loss']:.3f}" if p["loss"] is not None else "-"
        lines.append(
            f"  {p['name']:<8} {p['state']:<7} {p['num_tokens']:>11,} tok "
            f"{p['tokens_per_s']:>8,.0f} tok/s  loss {loss}  step {p['step']}"
        )
    return lines


def _usable(data: Path) -> bool:
    """Whether an earlier demo's prepared data can be reused (same format, intact manifest)."""
    try:
        load_manifest(data)
    except CrowdtrainError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("DEMO_MINUTES", 3)))
    parser.add_argument("--workdir", type=Path, default=ROOT / "demo-data")
    parser.add_argument(
        "--spec",
        type=Path,
        default=Path(os.environ.get("DEMO_SPEC") or ROOT / "examples" / f"{RUN_ID}.toml"),
        help="the run spec to publish (make demo DEMO_SPEC=examples/stdlib-diloco.toml)",
    )
    args = parser.parse_args()
    try:
        run_id = load_spec(args.spec).run.id
    except CrowdtrainError as e:
        sys.exit(f"demo: {e}")
    work = args.workdir.resolve()
    data, coord = work / "data", work / "coordinator"
    work.mkdir(parents=True, exist_ok=True)
    coordinator_bin, node_bin = str(BIN / "crowdtrain-coordinator"), str(BIN / "crowdtrain-node")

    # Each demo starts a fresh run; the prepared corpus is kept between demos.
    for stale in (coord, *(work / name for name in NODES)):
        shutil.rmtree(stale, ignore_errors=True)
    if not _usable(data):
        print("preparing the bundled corpus (Python's standard library)...")
        run(coordinator_bin, "prepare-data", "--source", "stdlib", "--out", str(data))
    run(
        coordinator_bin, "publish", str(args.spec),
        "--data-dir", str(coord), "--data", str(data),
    )  # fmt: skip

    children: list[Child] = []
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    try:
        (coord / "ports.json").unlink(missing_ok=True)
        server = Child(
            "coordinator",
            [coordinator_bin, "serve", "--data-dir", str(coord), "--http-port", "0",
             "--grpc-port", "0", "--dht-port", "0"],
            work / "coordinator.log",
        )  # fmt: skip
        children.append(server)
        while not (coord / "ports.json").exists():
            if server.popen.poll() is not None or time.monotonic() - started > 120:
                sys.exit(f"demo: the coordinator did not start; see {server.log}")
            time.sleep(0.2)
        url = json.loads((coord / "ports.json").read_text())["http_url"]
        print(f"coordinator at {url}: open {url}/runs/{run_id} in a browser for the live dashboard")
        for name in NODES:
            children.append(
                Child(
                    name,
                    [
                        node_bin,
                        "join",
                        url,
                        "--run",
                        run_id,
                        "--home",
                        str(work / name),
                        "--name",
                        name,
                        "--threads",
                        "1",
                        "--progress",
                        "bar",
                    ],
                    work / f"{name}.log",
                )  # fmt: skip
            )
        deadline = time.monotonic() + args.minutes * 60
        view: list[str] = []
        last_view = last_print = 0.0
        drawn = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now - last_view >= 5:
                view, last_view = coordinator_view(url, run_id), now
            nodes = [c.last_line[:160] for c in children[1:]]
            block = [*nodes, *view]
            if interactive:
                sys.stdout.write("\x1b[F\x1b[2K" * drawn + "\n".join(block) + "\n")
                sys.stdout.flush()
                drawn = len(block)
            elif now - last_print >= 15:
                print("\n".join(block), flush=True)
                last_print = now
            if all(c.popen.poll() is not None for c in children[1:]):
                print("demo: both nodes stopped early; see their logs below")
                break
            time.sleep(0.5)
        print("\nstopping the nodes (they leave the run cleanly)...")
        for child in children[1:]:
            child.stop(timeout=60)
        print("\n".join(coordinator_view(url, run_id)))
    except KeyboardInterrupt:
        print("\ndemo interrupted; stopping everything it started")
    finally:
        for child in reversed(children):
            child.stop(timeout=30)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
    print(f"  data         {data}")
    print(f"  database     {coord / 'coordinator.db'}")
    for name in NODES:
        print(f"  checkpoint   {work / name / 'runs' / run_id / 'checkpoint.safetensors'}")
    kept = sorted((coord / "checkpoints" / run_id).glob("step-*.safetensors"))
    if kept:
        print(f"  kept         {kept[-1]} (the keeper's latest)")
    print(f"  logs         {work}/*.log")
    if kept:
        print("\nthe model comes out:")
        print(f"  crowdtrain-coordinator sample --run {run_id} --data-dir {coord} --prompt 'def '")
        print(f"  crowdtrain-coordinator export --run {run_id} --data-dir {coord} --format hf OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
