"""``crowdtrain-node --log-json``: every line the node writes to stderr is a JSON object with
time, level, logger and message, hivemind's records included."""

from __future__ import annotations

import json
import logging
import signal
import subprocess

from crowdtrain.node import cli
from tests.swarm import NODE


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    records = [json.loads(line) for line in lines]  # each line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    return records


def test_log_json_turns_a_failed_join_into_json_lines(tmp_path):
    result = subprocess.run(
        [NODE, "--log-json", "join", "http://127.0.0.1:9", "--run", "tiny"]
        + ["--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    records = _json_lines(result.stderr)
    error = records[-1]
    assert error["level"] == "ERROR" and error["logger"] == "crowdtrain.node"
    assert "cannot reach the coordinator at http://127.0.0.1:9" in error["message"]


def test_without_log_json_the_error_is_one_plain_line(tmp_path):
    result = subprocess.run(
        [NODE, "join", "http://127.0.0.1:9", "--run", "tiny", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("crowdtrain-node: error: cannot reach the coordinator")
    )


def test_hivemind_records_become_json_lines_too(capsys, monkeypatch):
    """_join's logging set-up (hivemind's handler routed to the root logger), in-process."""
    from hivemind.utils.logging import get_logger, use_hivemind_log_handler

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(
            "crowdtrain.node.node.Node", _StopHere, raising=True
        )  # _join stops right after its logging set-up, as it starts the node
        args = cli._parser().parse_args(["--log-json", "join", "http://x", "--run", "r"])
        try:
            cli._join(args)
        except _Stopped:
            pass
        get_logger("hivemind.averaging.test").warning("a hivemind warning")
        records = _json_lines(capsys.readouterr().err)
        assert {
            "level": "WARNING",
            "logger": "hivemind.averaging.test",
            "message": "a hivemind warning",
        }.items() <= records[-1].items()
    finally:
        use_hivemind_log_handler("in_hivemind")
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for signum, handler in handlers.items():  # _join takes them for the node
            signal.signal(signum, handler)


class _Stopped(Exception):
    pass


class _StopHere:
    @classmethod
    def start(cls, *args, **kwargs):
        raise _Stopped
