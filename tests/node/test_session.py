"""The notebook API: join, train, stats, the live model, interrupt and leave, in a real process.

The session runs in a subprocess of its own (hivemind in that process's main
thread, as in a notebook's kernel), against a real coordinator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from types import SimpleNamespace
from typing import Any

import pytest

from crowdtrain.node import join
from crowdtrain.node.stats.loop_time import LoopTime
from crowdtrain.node.stats.progress import Progress, status_line
from crowdtrain.node.stats.traffic import Traffic
from crowdtrain.protocol.errors import CrowdtrainError
from tests.swarm import Swarm, small_corpus, write_spec

SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, sys, time
    from crowdtrain.node import join
    from crowdtrain.protocol.errors import CrowdtrainError

    url, home = sys.argv[1], sys.argv[2]
    # Stuck: every thread's stack into the test's failure message, then exit.
    faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)

    def say(**event):
        print("@@" + json.dumps(event), flush=True)

    try:
        join(url, run="nope", home=home)
    except CrowdtrainError as e:
        say(event="unknown_run", error=str(e))
    options = dict(home=home, client_mode=False, threads=1, progress="log", name="nb")
    session = join(url, run="tiny", **options)
    say(event="joined", repr=repr(session))
    stats = session.train(steps=1)
    say(event="trained", tokens=stats.num_tokens, step=stats.step, repr=repr(stats))
    say(event="long")
    started = time.monotonic()
    stats = session.train(seconds=120)
    say(event="interrupted", elapsed=time.monotonic() - started, tokens=stats.num_tokens)
    stats = session.train(steps=1)
    model = session.model
    say(
        event="again",
        tokens=stats.num_tokens,
        step=stats.step,
        loss=stats.loss,
        val_loss=stats.val_loss,
        params=sum(p.numel() for p in model.parameters()),
        text=session.generate("def ", max_new_tokens=16, temperature=0),
    )
    try:
        join(url, run="tiny", **options)
    except CrowdtrainError as e:
        say(event="second_join", error=str(e))
    session.leave()
    session.leave()
    try:
        session.train(steps=1)
    except CrowdtrainError as e:
        say(event="after_leave", error=str(e), text=session.generate("x", max_new_tokens=4))
    # Joins again and exits without leaving: the session leaves as the interpreter exits.
    join(url, run="tiny", **{**options, "progress": "none"})
    say(event="rejoined")
    """
)


def test_the_status_line_shows_shard_credit_and_uplink(capsys: pytest.CaptureFixture) -> None:
    traffic = Traffic()
    traffic.add("averaging", sent=1_000_000, received=5)
    traffic.add("state", sent=250_000)
    traffic.add("data", received=9_000_000)  # downloads are not on the uplink
    stats = SimpleNamespace(  # the fields of NodeStats the line shows
        step=12, tokens_per_s=3456.0, loss=2.3456, val_loss=None, num_peers=3,
        shard="train-00017", verified_tokens=1_234_567, num_tokens=5000, traffic=traffic,
        time=LoopTime(),
    )  # fmt: skip
    assert status_line(stats) == (
        "step 12 | 3.5k tok/s | loss 2.346 | val - | peers 3 | shard train-00017 | "
        "verified 1.2M tok | up 1.2 MB (averaging 1.0, state 0.2, control 0.0, data 0.0)"
    )
    # once the training loop ran: its share of time spent computing
    stats.time.start()
    time.sleep(0.05)
    stats.time.stop()
    stats.time.add(computing_s=0.8 * stats.time.split().training_s)
    assert "| 3.5k tok/s | computing 80% | loss 2.346 |" in status_line(stats)
    # Outside a Jupyter kernel the notebook bar is tqdm's text bar, on stderr.
    bar = Progress("notebook", "nb")
    bar.update(stats, 512)
    bar.close(stats)
    assert "nb: 512tok" in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress mode 'fancy' is not one of auto, bar"):
        Progress("fancy", "nb")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_input_is_refused_before_anything_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(CrowdtrainError, match=r"cannot reach the coordinator at http://127"):
        join(url, run="tiny", home=home)
    with pytest.raises(CrowdtrainError, match="must start with http"):
        join("127.0.0.1:8470", run="tiny", home=home)
    with pytest.raises(CrowdtrainError, match=r"no option 'threds'; options are: .*threads"):
        join(url, run="tiny", threds=2)
    with pytest.raises(CrowdtrainError, match=r"device='tpu': use one of auto, cpu, cuda, mps"):
        join(url, run="tiny", device="tpu")
    with pytest.raises(CrowdtrainError, match=r"progress='fancy'"):
        join(url, run="tiny", progress="fancy")
    with pytest.raises(CrowdtrainError, match=r"threads=0: give a whole number"):
        join(url, run="tiny", threads=0)
    with pytest.raises(CrowdtrainError, match=r"client_mode='yes': give True or False"):
        join(url, run="tiny", client_mode="yes")
    with pytest.raises(CrowdtrainError, match=r"run='': give the id"):
        join(url, run="")
    with pytest.raises(CrowdtrainError, match=r"ca_cert=.*existing PEM file"):
        join(url, run="tiny", ca_cert=tmp_path / "missing.pem")
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            join(url, run="tiny", home=home)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert isinstance(errors[0], CrowdtrainError) and "main thread" in str(errors[0])
    assert not home.exists(), "nothing is created for refused input"


STUCK_S = 300  # the script normally ends within a minute, even on a loaded machine


def _events(process: subprocess.Popen, lines: list[str]) -> Any:
    """Yield the script's events as they come; keep every line for the failure message.

    Ends when the script has exited and printed everything, not at the end of its output:
    a hivemind child process that outlives the script for a while holds the pipe open.
    """
    assert process.stdout is not None
    out = process.stdout
    queue: Queue[str | None] = Queue()

    def read() -> None:
        for line in out:
            queue.put(line)
        queue.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STUCK_S + 60
    while time.monotonic() < deadline:
        try:
            line = queue.get(timeout=1.0)
        except Empty:
            if process.poll() is not None:
                return  # exited, and nothing more came for a second
            continue
        if line is None:
            return
        lines.append(line)
        if line.startswith("@@"):
            yield json.loads(line[2:])


@pytest.mark.slow
def test_session_trains_is_interrupted_and_leaves(swarm: Swarm) -> None:
    corpus = small_corpus(swarm.root / "corpus", 400_000)
    data = swarm.prepare(65_536, str(corpus))
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    script = swarm.root / "session_script.py"
    script.write_text(SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), swarm.url, str(swarm.root / "home"), str(STUCK_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    events: dict[str, dict] = {}
    try:
        for event in _events(process, lines):
            events[event["event"]] = event
            if event["event"] == "long":
                time.sleep(4)
                process.send_signal(signal.SIGINT)  # the kernel's interrupt button
        assert process.wait(timeout=120) == 0, "".join(lines[-300:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        else:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # hivemind children left behind
            except ProcessLookupError:
                pass
    log = "".join(lines[-80:])
    assert "runs: 'tiny'" in events["unknown_run"]["error"], log
    assert "run='nope'" in events["unknown_run"]["error"], log
    assert "run='tiny'" in events["joined"]["repr"], log
    trained = events["trained"]
    assert trained["tokens"] > 0 and trained["step"] >= 1, log
    assert "SessionStats(run='tiny', step=" in trained["repr"], log
    # Interrupted well before its 120 s, and the session trains on afterwards.
    assert events["interrupted"]["elapsed"] < 60, log
    assert events["interrupted"]["tokens"] > trained["tokens"], log
    again = events["again"]
    assert again["tokens"] > events["interrupted"]["tokens"] and again["step"] >= 2, log
    assert again["val_loss"] is not None and again["params"] > 10_000, log
    assert again["text"].startswith("def ") and len(again["text"]) > 4, log
    assert "already in run 'tiny'" in events["second_join"]["error"], log
    assert "has left run 'tiny'" in events["after_leave"]["error"], log
    assert events["after_leave"]["text"].startswith("x"), "the model outlives the session"
    assert "rejoined" in events, log
    peers = swarm.get("/api/runs/tiny/peers")
    assert [p["name"] for p in peers] == ["nb"], peers
    # The forgotten session left as the interpreter exited.
    assert peers[0]["state"] == "left" and peers[0]["num_tokens"] > 0, peers
    assert (swarm.root / "home" / "runs" / "tiny" / "checkpoint.safetensors").is_file()
