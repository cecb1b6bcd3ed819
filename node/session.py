"""The notebook API: join a run from Python and train in this very process.

:func:`join` checks its input, then starts the same
:class:`~crowdtrain.node.node.Node` that ``crowdtrain-node join`` runs; the
:class:`Session` it returns trains when asked, holds the live model, and
leaves the run on :meth:`Session.leave`, at the end of a ``with`` block, or
when the interpreter exits. Knows nothing of Jupyter itself: a kernel runs
cells in its main thread, which is all hivemind asks for.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import TypeAdapter

from crowdtrain.node.link.http import discover, download_file, tls_verify
from crowdtrain.node.stats.progress import MODES
from crowdtrain.protocol import api
from crowdtrain.protocol.errors import CrowdtrainError

if TYPE_CHECKING:
    from crowdtrain.model import GPT, Tokenizer
    from crowdtrain.node.node import Node

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
# The sessions of this process that have not left yet (at most one: see join).
_LIVE: list[Session] = []


@dataclass(frozen=True, repr=False)
class SessionStats:
    """A snapshot of a session's counters, cumulative since it joined.

    ``verified_tokens`` is the coordinator's count of this peer's tokens that
    passed its checks (its credit), which lags ``num_tokens`` by a shard or so.
    """

    run_id: str
    step: int
    num_tokens: int
    tokens_per_s: float
    loss: float | None
    val_loss: float | None
    num_peers: int
    verified_tokens: int
    shard: str
    train_s: float
    num_skipped_steps: int

    def __repr__(self) -> str:
        def num(x: float | None, fmt: str) -> str:
            return "None" if x is None else format(x, fmt)

        return (
            f"SessionStats(run={self.run_id!r}, step={self.step}, "
            f"num_tokens={self.num_tokens:,}, tokens_per_s={self.tokens_per_s:,.0f}, "
            f"loss={num(self.loss, '.4f')}, val_loss={num(self.val_loss, '.4f')}, "
            f"num_peers={self.num_peers}, verified_tokens={self.verified_tokens:,}, "
            f"shard={self.shard!r}, train_s={self.train_s:.1f}, "
            f"num_skipped_steps={self.num_skipped_steps})"
        )


class Session:
    """This process's place in a run: made by :func:`join`, ended by :meth:`leave`.

    Between :meth:`train` calls the session stays in the run (it heartbeats and
    keeps its shard leases) so that training can go on; :meth:`leave` when done.
    A session still in the run when the interpreter (or kernel) exits leaves then.
    """

    def __init__(self, node: Node, url: str, run_id: str):
        self._node = node
        self.url = url
        self.run_id = run_id
        self._left = False
        self._lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None

    # what a researcher reads

    @property
    def stats(self) -> SessionStats:
        """The node's counters now (a frozen snapshot)."""
        s = self._node.stats
        num_peers = self._node.num_peers
        return SessionStats(
            run_id=self.run_id,
            step=s.step,
            num_tokens=s.num_tokens,
            tokens_per_s=s.tokens_per_s,
            loss=s.loss,
            val_loss=s.val_loss,
            num_peers=num_peers,
            verified_tokens=s.verified_tokens,
            shard=s.shard,
            train_s=s.train_s,
            num_skipped_steps=s.num_skipped_steps,
        )

    @property
    def model(self) -> GPT:
        """The live :class:`~crowdtrain.model.GPT` this session trains, on its device.

        Training mutates it in place (every :meth:`train` call, and the swarm's
        averaging at each step): evaluate or sample between calls, and take
        ``copy.deepcopy(session.model)`` for a snapshot that stays put. It stays
        usable after :meth:`leave`.
        """
        return self._node.model

    @property
    def left(self) -> bool:
        """Whether :meth:`leave` has run."""
        return self._left

    @property
    def checkpoint_path(self) -> Path:
        """Where this session saves the model (at each evaluation and on leaving)."""
        return self._node.checkpoint_path

    def __repr__(self) -> str:
        state = "left" if self._left else "in the run"
        s = self.stats
        return (
            f"<crowdtrain Session run={self.run_id!r} at {self.url} ({state}): "
            f"step {s.step}, {s.num_tokens:,} tokens trained, {s.num_peers} peers>"
        )

    # what a researcher does

    def train(self, steps: int | None = None, seconds: float | None = None) -> SessionStats:
        """Train for ``steps`` more swarm steps or ``seconds``, whichever ends first.

        With neither, trains until interrupted. Shows a progress bar (a widget
        in Jupyter, text elsewhere). Interrupting (the kernel's stop button,
        Ctrl-C) stops at the next micro-batch and returns; the session stays in
        the run, so :meth:`train` can go on. A second interrupt stops at once.
        Raises :class:`CrowdtrainError` if the node had to stop (a bad shard,
        say): then :meth:`leave` and join again.
        """
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise CrowdtrainError(f"steps={steps!r}: give a whole number of steps, 1 or more")
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0
        ):
            raise CrowdtrainError(f"seconds={seconds!r}: give a positive number of seconds")
        self._check_live()
        node = self._node
        node.stop_event.clear()
        interrupted = False
        previous: Any = None
        owner = os.getpid()

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            nonlocal interrupted
            if os.getpid() != owner:  # a child forked meanwhile: not ours to stop
                return
            if node.stop_event.is_set():
                raise KeyboardInterrupt
            interrupted = True
            logger.info("stopping at the next micro-batch (interrupt again to stop at once)")
            node.stop_event.set()

        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            node.train(steps=steps, seconds=seconds)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if node.fatal is None:
                node.stop_event.clear()
        if interrupted:
            logger.warning(
                "training interrupted at step %d; the session is still in run %s: "
                "train() again, or leave()",
                node.stats.step,
                self.run_id,
            )
        return self.stats

    def evaluate(self) -> float:
        """The live model's validation loss on the run's held-out shard, now (also reported)."""
        self._check_live()
        return self._node.evaluate()

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (BPE runs fetch and check ``tokenizer.json`` once)."""
        if self._tokenizer is None:
            from crowdtrain.model.tokenizer import load_tokenizer

            manifest = self._node.manifest
            path = None
            if manifest.tokenizer == "bpe":
                path = self._node.run_dir / "tokenizer.json"
                if not path.is_file():
                    # Its own connection: this also works after leave() closed the node's.
                    # Checked as it lands: a wrong file never takes the name.
                    verify = tls_verify(self._node.config.ca_cert)
                    with httpx.Client(timeout=30.0, verify=verify) as http:
                        url = api.url(self.url, api.TOKENIZER, run_id=self.run_id)
                        download_file(
                            http, url, path, path.name, "none", sha256=manifest.tokenizer_sha256
                        )
            self._tokenizer = load_tokenizer(manifest.tokenizer, path, manifest.tokenizer_sha256)
        return self._tokenizer

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
    ) -> str:
        """``prompt`` and a continuation sampled from the live model, as text.

        ``temperature`` 0 is greedy; ``top_k`` keeps the k likeliest tokens.
        """
        import torch

        if not isinstance(prompt, str):
            raise CrowdtrainError(f"prompt={prompt!r}: give the text to continue, a str")
        tokenizer = self.tokenizer
        ids = [int(i) for i in tokenizer.encode(prompt)]
        if not ids:  # start from the end-of-document token: a fresh document
            ids = [int(getattr(tokenizer, "eod_id", 0))]
        model = self.model
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], dtype=torch.long, device=device),
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
            )
        return prompt + tokenizer.decode(out[0, len(ids) :].tolist())

    def leave(self) -> SessionStats:
        """Leave the run: save a checkpoint, return this peer's shard leases, tell the
        coordinator, and stop hivemind's processes. Safe to call again."""
        with self._lock:
            if self._left:
                return self.stats
            self._left = True
        try:
            self._node.shutdown()
        finally:
            if self in _LIVE:
                _LIVE.remove(self)
        stats = self.stats
        logger.info(
            "left run %s: %s tokens trained, step %d",
            self.run_id,
            f"{stats.num_tokens:,}",
            stats.step,
        )
        return stats

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def _check_live(self) -> None:
        if self._left:
            raise CrowdtrainError(
                f"this session has left run {self.run_id!r}; join again with "
                f"crowdtrain.node.join({self.url!r}, run={self.run_id!r})"
            )
        if self._node.fatal is not None:
            raise CrowdtrainError(
                f"this session stopped: {self._node.fatal}; call leave(), then join again"
            )


def join(url: str, run: str, **options: Any) -> Session:
    """Join run ``run`` of the coordinator at ``url`` and return a :class:`Session`.

    The session trains in this process on the same machinery as
    ``crowdtrain-node join``; call :meth:`Session.train`, then
    :meth:`Session.leave` (or use ``with join(...) as session:``). Joining
    takes a few seconds to a minute: registration, the data check, the
    model, the swarm, and the swarm's latest state if the run is under way.

    ``options`` are :class:`~crowdtrain.node.config.NodeConfig`'s fields:
    ``home``, ``name``, ``device`` (auto, cpu, cuda, mps), ``threads``,
    ``progress`` (notebook, bar, log, none; default notebook), ``client_mode``,
    ``dht_host``, ``dht_port``, ``announce_host``, ``cache_bytes``,
    ``prefetch_shards``, ``invite``, ``ca_cert``, ``micro_batch``, ``compile``.

    ``client_mode`` defaults to True here (False for the command line): a
    notebook usually runs on a laptop or a hosted kernel behind NAT or a
    firewall, where other peers cannot dial in, and a full peer that cannot be
    dialled stalls the swarm's averaging rounds. A client-mode peer dials out
    only; it trains and averages its gradients with the swarm all the same,
    but serves no state to newcomers. On a machine peers can reach, pass
    ``client_mode=False, dht_host="0.0.0.0", announce_host="<public address>"``.

    ``home`` defaults to ``$CROWDTRAIN_HOME``, else ``~/.crowdtrain/notebook``:
    a folder of its own, so that a notebook and a ``crowdtrain-node`` daemon on
    one machine are two peers, not one identity registered twice.

    Call it from the main thread (a notebook's cells run there): hivemind
    installs signal handlers as it starts. One session per process at a time.
    Raises :class:`CrowdtrainError` naming the bad input before anything
    starts: an unreachable coordinator, an unknown run, an unknown option.
    """
    if not isinstance(url, str) or not url.strip():
        raise CrowdtrainError(f"url={url!r}: give the coordinator's URL, e.g. http://host:8470")
    if not isinstance(run, str) or not run.strip():
        raise CrowdtrainError(
            f"run={run!r}: give the id of the run to join, e.g. run='stdlib-tiny'"
        )
    url = url.strip().rstrip("/")
    values = _checked_options(options)
    if threading.current_thread() is not threading.main_thread():
        raise CrowdtrainError(
            "join() must be called from the main thread (hivemind installs signal handlers "
            "there); call it from a notebook cell or the main script, not a thread"
        )
    if _LIVE:
        live = _LIVE[0]
        raise CrowdtrainError(
            f"this process is already in run {live.run_id!r} at {live.url}; call leave() on "
            "that session first (or restart the kernel)"
        )
    discover(url, ca_cert=values.get("ca_cert"))
    _check_run(url, run, values.get("ca_cert"))
    _use_fork()
    # hivemind reads its log level once, at import; a notebook wants its warnings only.
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    dht_logger = logging.getLogger("hivemind.dht.dht")
    if dht_logger.level == logging.NOTSET:
        # As the command line does: when averagers stop, the DHT process (forked with
        # this level) logs a traceback per request they left half-sent: noise, not a fault.
        dht_logger.setLevel(logging.CRITICAL)
    from crowdtrain.node.config import NodeConfig
    from crowdtrain.node.device.hooks import TestHooks
    from crowdtrain.node.node import Node

    # The test hooks are read once, here, where this process joins.
    config = NodeConfig(url=url, run_id=run, hooks=TestHooks.from_env(), **values)
    previous = signal.getsignal(signal.SIGINT)
    try:
        node = Node.start(config)  # a join that fails shuts down what it started
    finally:
        # hivemind set SIGINT to be ignored while it started: give the kernel its interrupts.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    session = Session(node, url, run)
    _LIVE.append(session)
    _leave_at_exit()
    return session


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """NodeConfig's keyword arguments from ``options`` and the notebook's defaults, each
    checked before anything is imported or started."""
    known = _OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CrowdtrainError(
            f"join() has no option {unknown[0]!r}; options are: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {
        "home": Path(os.environ.get("CROWDTRAIN_HOME") or Path.home() / ".crowdtrain" / "notebook"),
        "client_mode": True,
        "progress": "notebook",
        **options,
    }

    def bad(key: str, fix: str) -> CrowdtrainError:
        return CrowdtrainError(f"join() option {key}={values[key]!r}: {fix}")

    for key, kind in known.items():
        if key not in values:
            continue
        value = values[key]
        if kind == "path":
            if not isinstance(value, str | os.PathLike):
                raise bad(key, "give a folder or file path")
            values[key] = Path(value).expanduser()
        elif kind == "bool" and not isinstance(value, bool):
            raise bad(key, "give True or False")
        elif kind == "str" and not isinstance(value, str):
            raise bad(key, "give a string")
        elif kind == "port" and not (_is_int(value) and 0 <= value <= 65535):
            raise bad(key, "give a port number 0..65535 (0: any free port)")
        elif kind == "count" and value is not None and not (_is_int(value) and value >= 1):
            raise bad(key, "give a whole number, 1 or more")
        elif kind == "bytes" and value is not None and not (_is_int(value) and value >= 0):
            raise bad(key, "give a number of bytes, e.g. 4 << 30 for 4 GiB (None: no bound)")
    if values.get("device", "auto") not in DEVICES:
        raise bad("device", f"use one of {', '.join(DEVICES)}")
    if values["progress"] not in MODES:
        raise bad("progress", f"use one of {', '.join(MODES)}")
    micro_batch = values.get("micro_batch", "auto")
    if _is_int(micro_batch) and micro_batch >= 1:
        values["micro_batch"] = str(micro_batch)
    elif micro_batch != "auto" and not (isinstance(micro_batch, str) and micro_batch.isdigit()):
        raise bad("micro_batch", "give 'auto' or a number of sequences")
    if values.get("start_from", "auto") not in ("auto", "peers", "checkpoint"):
        raise bad("start_from", "give 'auto', 'peers' or 'checkpoint'")
    ca_cert = values.get("ca_cert")
    if ca_cert is not None and not ca_cert.is_file():
        raise bad("ca_cert", "give the path of an existing PEM file")
    return values


# NodeConfig's fields a caller may set, by the kind of value each takes.
_OPTIONS = {
    "home": "path",
    "name": "str",
    "device": "str",
    "threads": "count",
    "progress": "str",
    "dht_host": "str",
    "dht_port": "port",
    "announce_host": "str",
    "client_mode": "bool",
    "cache_bytes": "bytes",
    "prefetch_shards": "count",
    "invite": "str",
    "ca_cert": "path",
    "micro_batch": "any",
    "compile": "bool",
    "start_from": "str",
}


def _check_run(url: str, run: str, ca_cert: Path | None) -> None:
    """A clear error for a run the coordinator does not have, naming those it has."""
    verify = tls_verify(ca_cert)
    try:
        response = httpx.get(api.url(url, api.RUN, run_id=run), timeout=10.0, verify=verify)
        if response.status_code == 404:
            listed = httpx.get(api.url(url, api.RUNS), timeout=10.0, verify=verify)
            runs = TypeAdapter(list[api.RunHead]).validate_json(listed.content)
            names = ", ".join(repr(r.id) for r in runs) or "none yet"
            raise CrowdtrainError(
                f"run={run!r}: the coordinator at {url} has no such run; its runs: {names}"
            )
        response.raise_for_status()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise CrowdtrainError(
            f"cannot read run {run!r} from the coordinator at {url}: {e}"
        ) from None


def _use_fork() -> None:
    """hivemind's processes need the fork start method (spawn cannot pickle its locks)."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method != "fork":
        if method is not None:
            logger.warning("switching multiprocessing from %r to 'fork' for hivemind", method)
        multiprocessing.set_start_method("fork", force=True)


def _leave_all() -> None:
    for session in list(_LIVE):
        try:
            session.leave()
        except Exception as e:  # leaving must go on for the others, and exit must not hang
            logger.warning("could not leave run %s cleanly: %s", session.run_id, e)


_registered = False


def _leave_at_exit() -> None:
    """Leave forgotten sessions when the interpreter exits, before it waits for threads:
    hivemind's threads would otherwise keep it from exiting (plain ``atexit`` runs after)."""
    global _registered
    if _registered:
        return
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError
        register(_leave_all)
    except RuntimeError:
        import atexit

        atexit.register(_leave_all)
    _registered = True


__all__ = ["Session", "SessionStats", "join"]
