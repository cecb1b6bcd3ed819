"""The Docker files, checked statically (no Docker engine runs here).

Each check is one a broken image or compose file would fail at build or
start: a COPY of a missing file, an entrypoint that is not installed, a
command the real parser refuses, a port nothing listens on, a healthcheck
path the app does not serve.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"node": DOCKER / "node.Dockerfile", "coordinator": DOCKER / "coordinator.Dockerfile"}
# Package indexes the files must not name (installers choose their own).
INDEX_HOSTS = ("pypi.org", "pythonhosted.org", "download.pytorch.org", "anaconda.org")


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        parsed = cls(path)
        logical = ""
        for line in path.read_text().splitlines():
            if not logical and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if logical and line.lstrip().startswith("#"):
                continue  # a comment inside a continued instruction
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            keyword, _, rest = logical.strip().partition(" ")
            parsed.instructions.append((keyword.upper(), rest.strip()))
            logical = ""
        assert not logical, f"{path}: the last instruction ends with a backslash"
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{self.path.name} has no {keyword}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT or CMD in JSON (exec) form: no shell between Docker and the program."""
        text = self.last(keyword)
        if keyword == "HEALTHCHECK":
            text = text[text.index("CMD ") + 4 :]
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["project"]["scripts"]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _coordinator_args(argv: list[str]):
    from crowdtrain.coordinator.cli import _parser

    return _parser().parse_args(argv)  # argparse exits on a flag it does not know


def _node_args(argv: list[str]):
    from crowdtrain.node.cli import _parser

    return _parser().parse_args(argv)


def _serve_ports(args) -> set[int]:
    return {args.http_port, args.grpc_port, args.dht_port}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_file_exists_and_nothing_ignored_is_copied(name: str) -> None:
    dockerfile = Dockerfile.read(DOCKERFILES[name])
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = dockerfile.all("COPY") + dockerfile.all("ADD")
    assert copies, f"{name}: copies nothing"
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in rest.split()), "no multi-stage copies"
        *sources, _destination = words
        for source in sources:
            assert glob.glob(str(ROOT / source)), f"{name}: COPY {source}: no such file"
            assert source not in ignored, f"{name}: COPY {source} but .dockerignore drops it"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoints_are_installed_console_scripts(name: str) -> None:
    dockerfile = Dockerfile.read(DOCKERFILES[name])
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert entrypoint == [f"crowdtrain-{name}"]
    assert entrypoint[0] in _scripts()
    # The package a console script runs is installed by the image.
    module = _scripts()[entrypoint[0]].split(":")[0]
    package_dir = module.split(".")[1]
    assert any(rest.split()[0] == package_dir for rest in dockerfile.all("COPY")), package_dir


def test_default_commands_parse_with_the_real_parsers() -> None:
    node_cmd = Dockerfile.read(DOCKERFILES["node"]).exec_form("CMD")
    assert node_cmd == ["--help"]
    coordinator = Dockerfile.read(DOCKERFILES["coordinator"])
    args = _coordinator_args(coordinator.exec_form("CMD"))
    assert args.command == "serve" and args.host == "0.0.0.0" and args.insecure
    assert str(args.data_dir) in coordinator.all("VOLUME")[0]


def test_node_image_keeps_the_base_torch_and_runs_as_a_user() -> None:
    node = Dockerfile.read(DOCKERFILES["node"])
    base = node.last("FROM")
    default = next(r for r in node.all("ARG") if r.startswith("BASE_IMAGE="))
    assert base == "${BASE_IMAGE}" and default.startswith("BASE_IMAGE=pytorch/pytorch:")
    assert re.search(r"-cuda[\d.]+-cudnn\d+-runtime$", default), default
    install = " ".join(r for r in node.all("RUN") if "pip install" in r)
    assert "--constraint" in install and "torch==" in install
    assert "torch" not in install.split("pip install")[1].split("&&")[0].replace(
        "--constraint /tmp/torch-constraint.txt", ""
    )
    assert node.last("USER") != "root"
    assert json.loads(node.last("VOLUME")) == ["/home/crowdtrain/.crowdtrain"]


def test_coordinator_image_pins_torch_and_exposes_what_serve_listens_on() -> None:
    coordinator = Dockerfile.read(DOCKERFILES["coordinator"])
    assert coordinator.last("FROM") == "python:3.11-slim"
    assert any("torch==2.13.0" in r for r in coordinator.all("RUN"))
    assert coordinator.last("USER") != "root"
    serve = _coordinator_args(coordinator.exec_form("CMD"))
    exposed = {int(p) for p in coordinator.last("EXPOSE").split()}
    assert exposed == _serve_ports(serve) == {8470, 8471, 8472}


def test_the_healthcheck_asks_a_real_route_on_the_http_port(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from crowdtrain.coordinator.api.http_app import Endpoints, create_app
    from crowdtrain.coordinator.api.refusals import Refusals
    from crowdtrain.coordinator.runs.leases import LeaseBook
    from crowdtrain.coordinator.store import Store
    from crowdtrain.protocol.identity import Identity

    coordinator = Dockerfile.read(DOCKERFILES["coordinator"])
    check = coordinator.exec_form("HEALTHCHECK")
    assert check[:2] == ["python", "-c"]  # slim has no curl
    (url,) = re.findall(r"'(http://[^']+)'", check[2])
    parts = urlsplit(url)
    serve = _coordinator_args(coordinator.exec_form("CMD"))
    assert parts.hostname == "127.0.0.1" and parts.port == serve.http_port

    store = Store(tmp_path)
    try:
        endpoints = Endpoints(http_url=url, grpc_target="127.0.0.1:8471", initial_peers=list)
        app = create_app(
            store, endpoints, LeaseBook(store), Refusals(), "k" * 43, Identity.generate()
        )
        response = TestClient(app).get(parts.path)
        assert response.status_code == 200, response.text
    finally:
        store.close()


def test_compose_services_build_existing_dockerfiles() -> None:
    services = _compose()["services"]
    assert {"coordinator", "node-a", "node-b"} <= services.keys()
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: builds from {context}"
        assert (context / build["dockerfile"]).resolve() in {
            p.resolve() for p in DOCKERFILES.values()
        }, f"{name}: {build['dockerfile']}"


def test_compose_coordinator_prepares_publishes_and_serves_the_demo_run() -> None:
    services = _compose()["services"]
    prepare = _coordinator_args(services["prepare"]["command"])
    publish = _coordinator_args(services["publish"]["command"])
    serve = _coordinator_args(services["coordinator"]["command"])
    assert prepare.command == "prepare-data" and prepare.source == ["stdlib"]
    assert publish.command == "publish" and publish.data == prepare.out
    assert serve.command == "serve" and serve.data_dir == publish.data_dir
    # The spec it publishes is one the image copies from the repository.
    copied = " ".join(Dockerfile.read(DOCKERFILES["coordinator"]).all("COPY"))
    spec_name = publish.spec.name
    assert f"examples/{spec_name}" in copied and (ROOT / "examples" / spec_name).exists()
    assert services["publish"]["depends_on"]["prepare"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["coordinator"]["depends_on"]["publish"]["condition"] == (
        "service_completed_successfully"
    )
    # Published ports are ports serve listens on; the DHT announces an IPv4 address.
    for mapping in services["coordinator"].get("ports", []):
        host, _, container = str(mapping).partition(":")
        assert int(container) in _serve_ports(serve) and int(host) == int(container)
    address = services["coordinator"]["networks"]["crowdtrain"]["ipv4_address"]
    assert serve.public_host == address and serve.host == "0.0.0.0" and serve.insecure


def test_compose_nodes_join_the_published_run_with_real_flags() -> None:
    from crowdtrain.protocol.runspec import load_spec

    compose = _compose()
    services = compose["services"]
    publish = _coordinator_args(services["publish"]["command"])
    run_id = load_spec(ROOT / "examples" / publish.spec.name).run.id
    serve = _coordinator_args(services["coordinator"]["command"])
    nodes = [n for n in services if n.startswith("node-")]
    assert len(nodes) == 2
    node_image = Dockerfile.read(DOCKERFILES["node"])
    home = json.loads(node_image.last("VOLUME"))[0]
    for name in nodes:
        service = services[name]
        args = _node_args(service["command"])
        assert args.command == "join" and args.run == run_id and args.device == "cpu"
        url = urlsplit(args.url)
        assert url.hostname in services and url.port == serve.http_port
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert any(v.endswith(f":{home}") for v in service["volumes"]), service["volumes"]
        address = service["networks"]["crowdtrain"]["ipv4_address"]
        assert args.announce_host == address and args.dht_host == "0.0.0.0"


def test_no_package_index_is_named() -> None:
    for path in [*DOCKERFILES.values(), COMPOSE, ROOT / ".dockerignore"]:
        text = path.read_text()
        for host in INDEX_HOSTS:
            assert host not in text, f"{path.name} names {host}"
        assert "--index-url http" not in text and "--extra-index-url" not in text
