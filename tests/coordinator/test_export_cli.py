"""`crowdtrain-coordinator export` and `sample` on a real data folder, as a user runs them.

The data folder holds a BPE run and a byte run, each prepared and published
through the command line, with checkpoints written the way the keeper writes
them (save_checkpoint, then the store's row); a learned-position run and a
run without checkpoints cover the refusals.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
import torch

from crowdtrain.coordinator.records import get_run
from crowdtrain.coordinator.store import Store
from crowdtrain.coordinator.swarm.checkpoints import CHECKPOINTS_DIR, checkpoint_name
from crowdtrain.model import GPT, GPTConfig, params_sha256, save_checkpoint
from tests.swarm import COORDINATOR, run_cli, small_corpus, write_spec

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _prepare(root: Path, corpus: Path, name: str, *extra: str) -> Path:
    out = root / name
    result = run_cli(
        COORDINATOR, "prepare-data", "--source", str(corpus), "--out", str(out),
        "--shard-tokens", "16384", "--val-fraction", "0.1", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def _publish(coord: Path, spec: Path, data: Path) -> None:
    result = run_cli(
        COORDINATOR, "publish", str(spec), "--data-dir", str(coord), "--data", str(data)
    )
    assert result.returncode == 0, result.stderr


def _keep_checkpoint(coord: Path, run_id: str, step: int) -> Path:
    """What Keeper.pull writes for ``step``: the file, then the store's row."""
    store = Store(coord)
    try:
        run = get_run(store, run_id)
        torch.manual_seed(step)
        model = GPT(GPTConfig.from_spec(run.spec.model))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        state = {k: v.detach() for k, v in model.state_dict().items()}
        sha256 = params_sha256(state)
        path = coord / CHECKPOINTS_DIR / run_id / checkpoint_name(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "run_id": run_id,
            "spec_hash": run.spec.hash,
            "step": str(step),
            "params_sha256": sha256,
            "num_tokens": str(step * 2048),
        }
        file_sha256 = save_checkpoint(path, state, metadata)
        store.insert_checkpoint(
            {
                "run_id": run_id,
                "step": step,
                "sha256": sha256,
                "file": path.name,
                "file_sha256": file_sha256,
                "num_bytes": path.stat().st_size,
                "spec_hash": run.spec.hash,
                "created_at": time.time(),
                "cpu_s": 0.1,
                "num_tokens": step * 2048,
            }
        )
    finally:
        store.close()
    return path


@pytest.fixture(scope="module")
def coord(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    corpus = small_corpus(root / "corpus", 120_000)
    bpe_data = _prepare(root, corpus, "bpe-data", "--tokenizer", "bpe", "--vocab-size", "400")
    byte_data = _prepare(root, corpus, "byte-data")
    vocab_size = json.loads((bpe_data / "manifest.json").read_text())["vocab_size"]
    coord = root / "coordinator"
    _publish(coord, write_spec(root / "bpe.toml", "bpe-run", 600.0, "bpe", vocab_size), bpe_data)
    _publish(coord, write_spec(root / "byte.toml", "byte-run"), byte_data)
    _publish(coord, write_spec(root / "empty.toml", "empty-run"), byte_data)
    learned = write_spec(root / "learned.toml", "learned-run")
    learned.write_text(
        learned.read_text().replace("d_model = 64", 'd_model = 64\npositions = "learned"')
    )
    _publish(coord, learned, byte_data)
    for run_id in ("bpe-run", "byte-run"):
        _keep_checkpoint(coord, run_id, 3)
        _keep_checkpoint(coord, run_id, 7)
    _keep_checkpoint(coord, "learned-run", 7)
    return coord


def _export(coord: Path, run_id: str, out: Path, *extra: str):
    return run_cli(
        COORDINATOR, "export", "--run", run_id, "--format", "hf", str(out),
        "--data-dir", str(coord), *extra,
    )  # fmt: skip


def _one_line_error(result, *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crowdtrain-coordinator: error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("run_id", ["bpe-run", "byte-run"])
def test_export_loads_in_transformers_and_generates(coord: Path, tmp_path: Path, run_id: str):
    out = tmp_path / "model"
    result = _export(coord, run_id, out)
    assert result.returncode == 0, result.stderr
    assert f"exported run {run_id} at step 7" in result.stdout

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("def main():\n    return ", return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 3
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.numel() == 12
    assert isinstance(tokenizer.decode(new_tokens), str)
    assert not any(p.name.startswith(".model") for p in tmp_path.iterdir())  # no staging left


def test_sample_prints_the_greedy_continuation_transformers_gives(coord: Path, tmp_path: Path):
    out = tmp_path / "model"
    assert _export(coord, "byte-run", out).returncode == 0
    result = run_cli(
        COORDINATOR, "sample", "--run", "byte-run", "--prompt", "def ", "--data-dir", str(coord),
        "--temperature", "0", "--max-new-tokens", "24",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ")

    # The same: a document start (end-of-document token), the prompt, greedy to eos.
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = torch.tensor([[tokenizer.eos_token_id, *tokenizer("def ")["input_ids"]]])
    generated = model.generate(prompt, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
    assert result.stdout == "def " + expected + "\n"


def test_export_of_an_older_step_and_sampling_a_bpe_run(coord: Path, tmp_path: Path):
    out = tmp_path / "old"
    result = _export(coord, "bpe-run", out, "--step", "3")
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["step"] == "3" and f.metadata()["num_tokens"] == str(3 * 2048)
    sampled = run_cli(
        COORDINATOR, "sample", "--run", "bpe-run", "--prompt", "import ", "--seed", "1",
        "--data-dir", str(coord), "--max-new-tokens", "20",
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("import ")


@pytest.fixture
def cli(capsys):
    """``crowdtrain-coordinator``'s ``main`` in this process: the same parsing, errors and
    exit codes, without a second of interpreter start per call."""
    from crowdtrain.coordinator.cli import main

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def call(*argv: str) -> subprocess.CompletedProcess:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    yield call
    root.handlers[:] = saved[0]  # main() installed its own log handler
    root.setLevel(saved[1])


def test_refusals_are_one_line_and_leave_out_untouched(coord: Path, tmp_path: Path, cli):
    out = tmp_path / "out"

    def export(run_id: str, *extra: str, data_dir: Path = coord, fmt: str = "hf"):
        return cli(
            "export",
            "--run",
            run_id,
            "--format",
            fmt,
            str(out),
            "--data-dir",
            str(data_dir),
            *extra,
        )

    _one_line_error(export("nope"), "no run 'nope'", "bpe-run", "byte-run")
    _one_line_error(export("empty-run"), "no checkpoint yet", "60 s")
    _one_line_error(export("learned-run"), "positions='learned'", "rotary")
    _one_line_error(export("byte-run", "--step", "5"), "no checkpoint of step 5")
    _one_line_error(export("byte-run", fmt="onnx"), "'onnx'", "hf")
    _one_line_error(
        export("byte-run", data_dir=tmp_path / "nowhere"), "not a coordinator data folder"
    )
    _one_line_error(
        cli("sample", "--run", "byte-run", "--top-k", "-1", "--data-dir", str(coord)), "--top-k"
    )
    assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line_error(export("byte-run"), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export("byte-run", "--force").returncode == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_a_tampered_checkpoint_is_refused(coord: Path, tmp_path: Path):
    path = coord / CHECKPOINTS_DIR / "byte-run" / checkpoint_name(3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    _one_line_error(_export(coord, "byte-run", out, "--step", "3"), "corrupted", "sha256")
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    sampled = run_cli(
        COORDINATOR, "sample", "--run", "byte-run", "--step", "3", "--data-dir", str(coord)
    )
    _one_line_error(sampled, "corrupted")


def test_log_json_writes_every_log_line_as_json(coord: Path):
    result = run_cli(
        COORDINATOR, "--log-json", "sample", "--run", "byte-run", "--data-dir", str(coord),
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= lines[0].keys()
    assert any("checkpoint of step 7" in line["message"] for line in lines)


def test_hivemind_and_verifier_lines_follow_log_json():
    import io
    import logging

    from hivemind.utils.logging import use_hivemind_log_handler

    from crowdtrain.coordinator.cli import _route_hivemind_logs
    from crowdtrain.coordinator.ledger.verifier import _log_flags
    from crowdtrain.protocol.logs import setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        setup_logging(json_lines=True, stream=stream)
        _route_hivemind_logs(verbose=False)
        logging.getLogger("hivemind.averaging").info("not shown unless verbose")
        logging.getLogger("hivemind.averaging").warning("a hivemind warning")
        assert "--log-json" in _log_flags()
        setup_logging(json_lines=False, stream=io.StringIO())
        assert "--log-json" not in _log_flags()
    finally:
        use_hivemind_log_handler("in_hivemind")
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["logger"] == "hivemind.averaging"


def test_log_json_goes_before_or_after_the_command():
    from crowdtrain.coordinator.cli import _parser

    parser = _parser()
    assert parser.parse_args(["--log-json", "serve", "--data-dir", "d"]).log_json
    assert parser.parse_args(["serve", "--data-dir", "d", "--log-json"]).log_json
    assert not parser.parse_args(["serve", "--data-dir", "d"]).log_json
