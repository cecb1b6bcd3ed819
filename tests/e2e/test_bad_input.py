"""Bad input gets one readable line and leaves every stored state as it was."""

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.swarm import COORDINATOR, NODE, Swarm, db_rows, run_cli, write_spec

pytestmark = pytest.mark.slow


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """One published run behind a live coordinator, shared by the node-side cases."""
    swarm = Swarm(root=tmp_path_factory.mktemp("live"))
    try:
        data = swarm.prepare()
        assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
        swarm.start_coordinator()
        yield swarm
    finally:
        swarm.stop_all()


def test_unknown_run_id(live: Swarm, tmp_path: Path) -> None:
    before = db_rows(live.coord_dir)
    result = run_cli(NODE, "join", live.url, "--run", "nope", "--home", str(tmp_path))
    assert_one_line_error(result, "no run 'nope'", "tiny")
    assert db_rows(live.coord_dir) == before


def test_unreachable_coordinator(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(
        NODE, "join", f"http://127.0.0.1:{port}", "--run", "x", "--home", str(tmp_path)
    )
    assert_one_line_error(result, "cannot reach the coordinator", str(port))


def test_url_without_scheme(tmp_path: Path) -> None:
    result = run_cli(NODE, "join", "127.0.0.1:8470", "--run", "x", "--home", str(tmp_path))
    assert_one_line_error(result, "must start with http://")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (("lr = 0.005", "lrr = 0.005"), ("[optimizer] lrr", "did you mean 'lr'")),
        (("d_model = 64", 'd_model = "64"'), ("[model] d_model", "must be an integer")),
        (("seq_len = 64", "seq_len = 64.5"), ("[model] seq_len", "must be an integer")),
        (("num_heads = 2", "num_heads = 3"), ("[model] d_model", "divisible by num_heads")),
        (("[swarm]", "[swarn]"), ("unknown key [swarn]",)),
    ],
)
def test_bad_spec_is_refused_and_nothing_stored(
    tmp_path: Path, live: Swarm, edit: tuple[str, str], fragments: tuple[str, ...]
) -> None:
    spec = write_spec(tmp_path / "bad.toml", run_id="bad")
    spec.write_text(spec.read_text().replace(*edit))
    before = db_rows(live.coord_dir)
    result = run_cli(
        COORDINATOR,
        "publish",
        str(spec),
        "--data-dir",
        str(live.coord_dir),
        "--data",
        str(live.root / "data"),
    )
    assert_one_line_error(result, str(spec), *fragments)
    assert db_rows(live.coord_dir) == before
    fresh = tmp_path / "fresh-coordinator"
    result = run_cli(
        COORDINATOR,
        "publish",
        str(spec),
        "--data-dir",
        str(fresh),
        "--data",
        str(live.root / "data"),
    )
    assert_one_line_error(result, *fragments)
    assert not fresh.exists()


def test_data_dir_that_is_not_one(tmp_path: Path, live: Swarm) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = write_spec(tmp_path / "ok.toml", run_id="other")
    before = db_rows(live.coord_dir)
    result = run_cli(
        COORDINATOR, "publish", str(spec), "--data-dir", str(live.coord_dir), "--data", str(empty)
    )
    assert_one_line_error(result, "not a crowdtrain data folder", "prepare-data")
    assert db_rows(live.coord_dir) == before
    assert list(empty.iterdir()) == []

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    result = run_cli(COORDINATOR, "serve", "--data-dir", str(a_file), "--http-port", "0")
    assert_one_line_error(result, "is a file, not a folder")
    assert a_file.read_text() == "not a folder"


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            COORDINATOR,
            "serve",
            "--data-dir",
            str(tmp_path / "c"),
            "--http-port",
            str(port),
            "--grpc-port",
            "0",
            "--dht-port",
            "0",
        )
    assert_one_line_error(result, f"port {port}", "already in use", "--http-port")


def test_tampered_shard_stops_the_node_naming_it(swarm: Swarm) -> None:
    data = swarm.prepare()
    assert swarm.publish(write_spec(swarm.root / "tiny.toml"), data).returncode == 0
    swarm.start_coordinator()
    for shard in data.glob("train-*"):
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0xFF
        shard.write_bytes(bytes(raw))
    tampered = folder_digest(data)
    node = swarm.start_node("node-a")
    assert node.wait(timeout=120) == 1, node.output()
    error = [line for line in node.output().splitlines() if "error:" in line]
    assert len(error) == 1, node.output()
    assert "failed its sha256 check twice" in error[0]
    assert "shard train-" in error[0]
    assert folder_digest(data) == tampered
    assert db_rows(swarm.coord_dir)["receipts"] == []


def test_hostile_control_plane_requests_are_refused_counted_and_change_nothing(
    live: Swarm,
) -> None:
    import time

    import grpc

    from crowdtrain.node.link.errors import CoordinatorError
    from crowdtrain.node.link.grpc import CoordinatorClient
    from crowdtrain.protocol import coordinator_pb2 as pb
    from crowdtrain.protocol import coordinator_pb2_grpc as pb_grpc
    from crowdtrain.protocol.identity import Identity, seal
    from crowdtrain.protocol.messages import ReceiptPayload
    from crowdtrain.protocol.rpc import KIND_HEARTBEAT, KIND_RECEIPT, envelope_to_pb

    identity = Identity.generate()
    target = live.get("/api/endpoints")["grpc_target"]
    client = CoordinatorClient(live.url, target, identity)
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(target))

    def receipt(shard_id: str, epoch: int = 0) -> ReceiptPayload:
        now = time.time()
        return ReceiptPayload(
            shard_id=shard_id,
            epoch=epoch,
            num_sequences=8,
            num_tokens=512,
            loss_sum=40.0,
            started=now - 5,
            finished=now,
        )

    def sealed(kind: str, payload: dict) -> pb.Envelope:
        # What a hostile client sends: a node's client builds only payloads that parse.
        return envelope_to_pb(seal(identity, kind, payload))

    token = client.register("tiny", "probe", "cpu", "").session_token
    [lease] = client.lease(token, 1)
    envelope = sealed(KIND_RECEIPT, receipt(lease.shard_id).model_dump())
    auth = (("authorization", f"Bearer {token}"),)
    assert stub.ReportShard(pb.ShardReport(envelope=envelope), metadata=auth).accepted
    before = db_rows(live.coord_dir)
    refused_before = sum(r["count"] for r in live.get("/api/refusals"))

    cases = [
        (lambda: client.lease("not-a-session", 1), "register again"),
        (lambda: client.report(token, receipt("train-00000", epoch=7)), "never leased"),
        (lambda: client.report(token, receipt(lease.shard_id)), "already receipted"),
        (
            lambda: stub.ReportShard(pb.ShardReport(envelope=envelope), metadata=auth),
            "replayed",
        ),
        (
            lambda: stub.Heartbeat(
                pb.HeartbeatRequest(envelope=sealed(KIND_HEARTBEAT, {"session_key": "x" * 16})),
                metadata=auth,
            ),
            "HeartbeatPayload",
        ),
        (lambda: client.register("no-such-run", "probe", "cpu", ""), "no run 'no-such-run'"),
    ]
    for call, message in cases:
        with pytest.raises((CoordinatorError, grpc.RpcError)) as refused:
            call()
        text = (
            refused.value.details()
            if isinstance(refused.value, grpc.RpcError)
            else str(refused.value)
        )
        assert message in text, text
    assert db_rows(live.coord_dir) == before
    refused = sum(r["count"] for r in live.get("/api/refusals"))
    assert refused - refused_before == len(cases)
    client.close()
