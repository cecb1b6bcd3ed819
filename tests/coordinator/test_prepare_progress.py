"""What `prepare-data` shows while it works: bars on a terminal, a few log lines otherwise."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import struct
import subprocess
import termios
import time

import pytest

from crowdtrain.coordinator.data import prepare, progress
from crowdtrain.coordinator.data.prepare import PrepareConfig, prepare_data
from tests.swarm import COORDINATOR, small_corpus


def test_a_terminal_shows_bars_with_shards_and_tokens_per_second(tmp_path):
    corpus = small_corpus(tmp_path / "corpus", 400_000)
    controller, terminal = pty.openpty()
    # 30 rows of 160 columns: a terminal of no size draws empty bars.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
    try:
        process = subprocess.Popen(
            [COORDINATOR, "prepare-data", "--source", str(corpus), "--out", str(tmp_path / "d")]
            + ["--shard-tokens", "65536"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        shown = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0, shown.decode(errors="replace")
    finally:
        os.close(controller)
    text = shown.decode(errors="replace")
    assert "reading" in text and "tokenizing" in text, text
    assert "tokens/s" in text and "shards" in text, text
    assert "100%" in text, text


def test_off_a_terminal_progress_is_a_few_log_lines(tmp_path, caplog, monkeypatch):
    corpus = small_corpus(tmp_path / "corpus", 400_000)
    monkeypatch.setattr(progress, "_LOG_EVERY_S", 0.0)  # every update logs here
    monkeypatch.setattr(prepare, "_BATCH_BYTES", 100_000)
    with caplog.at_level(logging.INFO, logger="crowdtrain.coordinator.data"):
        prepare_data(PrepareConfig(sources=(corpus,), out=tmp_path / "d", shard_tokens=65536))
    lines = [r.getMessage() for r in caplog.records]
    tokenizing = [line for line in lines if line.startswith("tokenizing: ")]
    assert tokenizing and "shards" in tokenizing[-1] and "tokens/s" in tokenizing[-1], lines
    assert "(100%)" in tokenizing[-1], tokenizing
    assert any(line.startswith("reading: ") for line in lines), lines


@pytest.mark.parametrize("every_s, most", [(10.0, 0)])
def test_a_quick_run_off_a_terminal_logs_no_progress_lines(tmp_path, caplog, every_s, most):
    corpus = small_corpus(tmp_path / "corpus", 100_000)
    with caplog.at_level(logging.INFO, logger="crowdtrain.coordinator.data"):
        prepare_data(PrepareConfig(sources=(corpus,), out=tmp_path / "d", shard_tokens=65536))
    progress = [r for r in caplog.records if r.getMessage().startswith(("reading:", "tokenizing:"))]
    assert len(progress) <= most
