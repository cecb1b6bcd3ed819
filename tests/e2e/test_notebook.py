"""examples/join_from_notebook.ipynb runs top to bottom in a real Jupyter kernel (this venv's
Python) against a real coordinator and one real node."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.swarm import Swarm, small_corpus, write_spec

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "join_from_notebook.ipynb"
KERNEL = "crowdtrain-test"


# Run before the notebook's last cell, and interrupted as a person would.
INTERRUPTED = """\
import time
started = time.monotonic()
session.train(seconds=300)
print(f"interrupted after {time.monotonic() - started:.0f} s")
print(f"trained on: {session.train(steps=1).num_tokens} tokens")"""


def _kernelspec(folder: Path, env: dict[str, str]) -> Path:
    """A kernel spec that starts ipykernel with this very interpreter (the venv's)."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "crowdtrain test (venv)",
                "language": "python",
                "env": env,
            }
        )
    )
    return folder


def test_notebook_joins_trains_plots_and_leaves(
    swarm: Swarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = small_corpus(swarm.root / "corpus", 400_000)
    data = swarm.prepare(65_536, str(corpus))
    published = swarm.publish(write_spec(swarm.root / "tiny.toml"), data)
    assert published.returncode == 0, published.stderr
    swarm.start_coordinator()
    swarm.start_node("node-a")

    def node_training() -> bool:
        return any(p["num_tokens"] > 0 for p in swarm.get("/api/runs/tiny/peers"))

    swarm.wait_for(node_training, timeout=120, what="node-a training")
    env = {
        "CROWDTRAIN_URL": swarm.url,
        "CROWDTRAIN_RUN": "tiny",
        "CROWDTRAIN_TRAIN_SECONDS": "5",
        "CROWDTRAIN_HOME": str(swarm.root / "notebook-home"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": str(swarm.root / "mpl"),
        # One torch thread, as the node has: two on two busy cores made sampling 20x slower.
        "OMP_NUM_THREADS": "1",
    }
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(swarm.root / "jupyter", env)))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in notebook.cells
        if cell.cell_type == "code"
    ), "the notebook is committed without outputs"
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=240,
        resources={"metadata": {"path": str(swarm.root)}},
    )
    interrupted = nbformat.v4.new_code_cell(INTERRUPTED)
    leave = next(i for i, c in enumerate(notebook.cells) if c.source.strip() == "session.leave()")
    notebook.cells.insert(leave, interrupted)
    try:
        # Each cell raises CellExecutionError, with its traceback, on any error.
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                timer = None
                if cell is interrupted:
                    # The kernel's stop button: SIGINT to the kernel's process group.
                    pgid = client.km.provisioner.pgid  # type: ignore[union-attr]
                    timer = threading.Timer(4.0, os.killpg, (pgid, signal.SIGINT))
                    timer.start()
                client.execute_cell(cell, index)
                if timer is not None:
                    timer.join()
    finally:
        nbformat.write(notebook, swarm.root / "executed.ipynb")  # to read what the kernel showed

    texts = [
        output.get("data", {}).get("text/plain", "") + output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    ]
    stats = next((t for t in texts if t.startswith("SessionStats(run='tiny'")), None)
    assert stats is not None, texts
    match = re.search(r"num_tokens=([\d,]+)", stats)
    assert match and int(match.group(1).replace(",", "")) > 0, stats
    stats_tokens = match.group(1).replace(",", "")
    assert any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    ), "the loss plot is drawn"
    said = "".join(o.get("text", "") for o in interrupted.outputs if o.get("name") == "stdout")
    match = re.search(r"interrupted after (\d+) s\ntrained on: (\d+) tokens", said)
    assert match and int(match.group(1)) < 60, interrupted.outputs
    assert int(match.group(2)) > int(stats_tokens), said
    peers = {p["name"]: p for p in swarm.get("/api/runs/tiny/peers")}
    assert peers["notebook"]["num_tokens"] > 0, peers
    assert peers["notebook"]["state"] == "left", peers
    assert peers["node-a"]["state"] == "active", peers
