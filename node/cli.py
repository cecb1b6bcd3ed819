"""``crowdtrain-node``: join a run and train, or show this node's identity.

Thin: flags (and the test hooks, read once from the environment) become a
:class:`~crowdtrain.node.config.NodeConfig`, and the same
:class:`~crowdtrain.node.node.Node` the notebook API uses does the work.
Ctrl-C or SIGTERM leaves at the next micro-batch: the coordinator is told,
the averagers and DHT shut down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from crowdtrain.node.device.priority import DEFAULT_NICE, MAX_NICE
from crowdtrain.node.stats.progress import MODES
from crowdtrain.protocol.errors import CrowdtrainError
from crowdtrain.protocol.logs import setup_logging
from crowdtrain.protocol.version import crowdtrain_version

if TYPE_CHECKING:
    from crowdtrain.node.node import Node

HOME_VARIABLE = "CROWDTRAIN_HOME"


def default_home() -> Path:
    """Where the identity and shard cache live without ``--home``: ``$CROWDTRAIN_HOME``
    (as the notebook API reads it), else ``~/.crowdtrain``. Read when the parser is built."""
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".crowdtrain")


def _parser() -> argparse.ArgumentParser:
    home = default_home()
    shown = str(home).replace("%", "%%")  # argparse %-formats help strings
    home_help = (
        f"identity and shard cache (default: ${HOME_VARIABLE}, else ~/.crowdtrain; now {shown})"
    )
    parser = argparse.ArgumentParser(
        prog="crowdtrain-node", description="Lend this machine to a crowdtrain run."
    )
    parser.add_argument(
        "--version", action="version", version=f"crowdtrain-node {crowdtrain_version()}"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line (time, level, logger, message), hivemind's too",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="join a run and train until stopped")
    join.add_argument("url", help="the coordinator's URL, e.g. http://coordinator:8470")
    join.add_argument("--run", required=True, help="the run id to join")
    join.add_argument("--home", type=Path, default=home, help=home_help)
    join.add_argument("--name", default="", help="how this node is shown to others")
    join.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    join.add_argument("--max-seconds", type=float, default=None, help="leave after this long")
    join.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    join.add_argument(
        "--nice",
        type=_nice,
        default=DEFAULT_NICE,
        help=f"CPU priority of training once it started, 0 (as started) to {MAX_NICE} "
        f"(lowest); the default {DEFAULT_NICE} lets the machine's other programs go first",
    )
    join.add_argument(
        "--cache-size",
        type=_size,
        default="4G",
        help="bound on the shard cache on disk, e.g. 500M or 20G (default 4G)",
    )
    join.add_argument(
        "--progress",
        default="auto",
        choices=list(MODES),
        help="progress display: a status bar on a terminal (auto), log lines, or none",
    )
    join.add_argument(
        "--dht-host", default="127.0.0.1", help="address for peer traffic (0.0.0.0 for all)"
    )
    join.add_argument("--dht-port", type=int, default=0, help="port for peer traffic (0: any)")
    join.add_argument(
        "--announce-host", default=None, help="public address peers should dial, if behind NAT"
    )
    join.add_argument(
        "--invite", default="", help="invite code for an invite-only run (needed once)"
    )
    join.add_argument(
        "--ca-cert",
        type=Path,
        default=None,
        help="PEM file of the authority behind the coordinator's TLS certificate",
    )
    join.add_argument(
        "--micro-batch",
        default="auto",
        help="sequences per forward pass: auto (a GPU probes its memory, a CPU takes the "
        "run's micro_batch_size) or a number",
    )
    join.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (slower start, faster steps on GPUs)",
    )
    join.add_argument(
        "--start-from",
        default="auto",
        choices=["auto", "peers", "checkpoint"],  # node/joining/bootstrap.py's START_FROM
        help="where a node joining a run under way gets its parameters: the coordinator's "
        "latest checkpoint over HTTP, or peers (auto: the checkpoint when it is of the run's "
        "current step, in sync mode; else peers, then the checkpoint if no peer serves state)",
    )
    join.add_argument(
        "--client-mode",
        action="store_true",
        help="take part without accepting connections (behind NAT or a firewall)",
    )

    ident = sub.add_parser("identity", help="show this node's public identity")
    ident.add_argument("--home", type=Path, default=home, help=home_help)
    return parser


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A byte count such as 800M or 20G."""
    number, unit = text.strip().upper().rstrip("B"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 800M or 20G") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return int(value)


def _nice(text: str) -> int:
    """A nice value, 0 to MAX_NICE."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_NICE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a nice value: give 0 (train at the priority the node started "
            f"with) to {MAX_NICE} (yield the CPU to every other program)"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    try:
        return _COMMANDS[args.command](args)
    except CrowdtrainError as e:
        _say(args, f"crowdtrain-node: error: {e}", logging.ERROR)
        return 1
    except KeyboardInterrupt:
        _say(args, "crowdtrain-node: interrupted", logging.WARNING)
        return 130


def _say(args: argparse.Namespace, line: str, level: int = logging.INFO) -> None:
    """A last word for the user: ``line`` on stderr, or a JSON log line under --log-json."""
    if args.log_json:
        message = line.removeprefix("crowdtrain-node: ")
        logging.getLogger("crowdtrain.node").log(level, "%s", message)
    else:
        print(line, file=sys.stderr)


def _identity(args: argparse.Namespace) -> int:
    from crowdtrain.protocol.identity import Identity

    path = args.home / "identity.pem"
    identity = Identity.load_or_create(path)
    print(
        f"peer id     {identity.peer_id}\npublic key  {identity.public_key.hex()}\nkey file    {path}"
    )
    return 0


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _join(args: argparse.Namespace) -> int:
    from hivemind.utils.logging import use_hivemind_log_handler

    from crowdtrain.node.config import NodeConfig
    from crowdtrain.node.device.hooks import TestHooks
    from crowdtrain.node.node import Node

    # hivemind's records go to the root logger's handler (text or JSON) like ours...
    use_hivemind_log_handler("nowhere")
    # (hivemind renames the WARNING level "WARN" when imported; log collectors expect WARNING)
    logging.addLevelName(logging.WARNING, "WARNING")
    # ...which resets the hivemind logger's level: quiet it again.
    setup_logging(args.verbose, args.log_json)
    if args.verbose:
        # -v is for crowdtrain's details; hivemind's debug lines stay behind its own variable.
        level = os.environ.get("HIVEMIND_LOGLEVEL", "INFO").upper()
        logging.getLogger("hivemind").setLevel(level if level in _LEVELS else "INFO")
    else:
        # When averagers stop, the DHT process logs a traceback for each request
        # they left half-sent; it is hivemind's shutdown noise, not a fault.
        logging.getLogger("hivemind.dht.dht").setLevel(logging.CRITICAL)
    owner = os.getpid()

    config = NodeConfig(
        start_from=args.start_from,
        url=args.url,
        run_id=args.run,
        home=args.home,
        name=args.name,
        device=args.device,
        threads=args.threads,
        nice=args.nice,
        progress=args.progress,
        dht_host=args.dht_host,
        dht_port=args.dht_port,
        announce_host=args.announce_host,
        client_mode=args.client_mode,
        cache_bytes=args.cache_size,
        invite=args.invite,
        ca_cert=args.ca_cert,
        micro_batch=args.micro_batch,
        compile=args.compile,
        hooks=TestHooks.from_env(),
    )

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a hivemind child forked with this handler: just exit
            os._exit(128 + signum)
        # Once: the join then shuts down what it started, and that must run to its end.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    node: Node | None = None
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        # A join that fails, or is interrupted, shuts down what it started before it raises.
        node = Node.start(config)
        # Trained from here: a signal asks the node to leave at its next micro-batch.
        leave = _leave_handler(node, owner)
        signal.signal(signal.SIGINT, leave)
        signal.signal(signal.SIGTERM, leave)
        stats = node.train(seconds=args.max_seconds)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if node is not None:
            node.shutdown()
    share = 100 * stats.data_wait_s / stats.train_s if stats.train_s else 0.0
    split = stats.time.split()
    whole = split.training_s or 1.0
    _say(
        args,
        f"left run {args.run}: {stats.num_tokens:,} tokens trained, step {stats.step}, "
        f"data wait {stats.data_wait_s:.2f}s of {stats.train_s:.1f}s training ({share:.2f}%), "
        f"computing {split.computing_s / whole:.1%}, waiting on the swarm "
        f"{split.swarm_wait_s / whole:.1%}, checkpoint {node.checkpoint_path}",
    )
    return 0


def _leave_handler(node: Node, owner: int) -> Callable[[int, FrameType | None], None]:
    """Ctrl-C or SIGTERM: leave at the next micro-batch; a second one leaves at once."""

    def leave(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a hivemind child forked with this handler: just exit
            os._exit(128 + signum)
        if node.stop_event.is_set():
            raise KeyboardInterrupt
        logging.getLogger(__name__).info("leaving the run (again to force)")
        node.stop_event.set()

    return leave


_COMMANDS = {"join": _join, "identity": _identity}

if __name__ == "__main__":
    sys.exit(main())
