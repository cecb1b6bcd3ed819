"""The run spec: a TOML file that says what a run trains and how.

Parsed once into frozen, typed sections; unknown or ill-typed keys are an
error that names the key and what was expected. :meth:`RunSpec.hash` pins a
spec by its resolved values (defaults filled in), not by its formatting.
Knows nothing about models, networking or storage.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crowdtrain.protocol.errors import SpecError

RUN_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PUBLIC_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RunSection:
    """Who the run is: its id (used in URLs and as hivemind's run_id) and seed."""

    id: str
    description: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ModelSection:
    """The GPT's shape; see :class:`crowdtrain.model.GPTConfig`."""

    vocab_size: int
    seq_len: int
    num_layers: int
    num_heads: int
    d_model: int
    mlp_ratio: int = 4
    positions: Literal["rotary", "learned"] = "rotary"
    dropout: float = 0.0


@dataclass(frozen=True)
class DataSection:
    """How the data is cut and handed out."""

    tokenizer: Literal["byte", "bpe"] = "byte"
    lease_s: float = 600.0


Compression = Literal["none", "fp16", "8bit", "quantile-8bit"]
# DiLoCo's pseudo-gradients may also go in 4 or 2 bits per value, or as the top
# pseudo_grad_topk of each tensor's values in 2 or 4 bits, with error feedback.
PseudoGradCompression = Literal[
    "none", "fp16", "8bit", "quantile-8bit", "4bit", "2bit", "topk-4bit", "topk-2bit"
]


@dataclass(frozen=True)
class OptimizerSection:
    """The collaborative optimizer.

    ``target_batch_size`` is in sequences per collaborative step, summed over
    all peers; ``micro_batch_size`` is what one forward pass holds on a CPU
    node (a CUDA node probes for the largest that fits its memory).

    ``mode = "sync"`` averages gradients every collaborative step (hivemind's
    Optimizer; ``delay_*`` and ``offload_optimizer`` overlap averaging with
    compute, one step stale). ``mode = "diloco"`` trains ``inner_steps`` local
    AdamW steps of ``inner_batch_size`` sequences per peer, then averages the
    pseudo-gradients (global minus local parameters), each peer weighted by the
    sequences it trained, and applies them with an outer Nesterov SGD. A round
    ends when the swarm has trained ``inner_steps * target_batch_size``
    sequences. ``*_compression`` picks what crosses the network: gradients
    (sync), pseudo-gradients (diloco) and state downloads and averaging.
    """

    target_batch_size: int
    mode: Literal["sync", "diloco"] = "sync"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    # sync
    offload_optimizer: bool = False
    delay_optimizer_step: bool = False
    delay_grad_averaging: bool = False
    grad_compression: Compression = "none"
    # diloco
    inner_steps: int = 100
    inner_batch_size: int = 16
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    outer_overlap: bool = True
    pseudo_grad_compression: PseudoGradCompression = "8bit"
    pseudo_grad_topk: float = 0.015625  # the share of each tensor sent by "topk-*" (1/64)
    # both
    state_compression: Compression = "none"


@dataclass(frozen=True)
class SwarmSection:
    """hivemind timings. Short values suit loopback; raise them on slow links.

    ``strict_steps`` (sync mode) keeps every peer's parameters bit for bit the
    swarm's: gradient rounds end exact (every member gets the same bytes, a
    partial round fails), and a peer whose round failed, or whose group averaged
    another step, skips the step and loads the state of a peer that took it
    (the keeper's follower first). Spot checks then match to the last bit. Off,
    hivemind's way: such a peer steps with its own (or a mixed) gradient and
    drifts from the swarm until the next state averaging, and its loss samples
    may miss the keeper's checkpoint. Each skipped step costs a state download."""

    matchmaking_time_s: float = 3.0
    averaging_timeout_s: float = 10.0
    request_timeout_s: float = 1.0
    metadata_expiration_s: float = 15.0
    average_state_every: int = 100
    load_state_timeout_s: float = 60.0
    strict_steps: bool = False


@dataclass(frozen=True)
class EvalSection:
    """How often nodes measure validation loss on the held-out shard."""

    every_steps: int = 5
    num_sequences: int = 64


@dataclass(frozen=True)
class AccessSection:
    """Who may join: anyone (``open``), holders of an invite code made by
    ``crowdtrain-coordinator invite`` (``invite``), or the listed Ed25519 public
    keys, hex as ``crowdtrain-node identity`` prints them (``allowlist``)."""

    mode: Literal["open", "invite", "allowlist"] = "open"
    allowlist: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifySection:
    """How the coordinator checks what peers claim.

    Every ``checkpoint_every_s`` the coordinator's keeper downloads the
    swarm's state and keeps it as a checkpoint. A ``spot_check_fraction`` of
    receipts is spot-checked (the checks cost under 1% of the swarm's compute even
    at 1.0, measured on CPU; a peer is checked at every receipt while on
    probation, see below, so the fraction prices established peers: at 0.1 one
    that starts faking every receipt is caught within 3 shards one time in four,
    at 0.7 about 19 times in 20; see BENCHMARKS.md):
    the verifier recomputes the loss of
    ``spot_check_sequences`` sequences of a batch the node trained (batch and
    sequences picked at random once the receipt arrived, among the losses of
    every sequence the receipt gives) with the checkpoint of that batch's
    step. It refuses the receipt when a claimed loss differs from its own by
    more than ``loss_tolerance`` nats, or when the differences lie more than
    ``spread_tolerance`` nats from their mean. The first leaves room for honest
    peers whose parameters drifted from the swarm's after an averaging round
    failed (up to 0.41 nats measured on loopback); such a drift moves every
    sequence's loss about alike (their differences lay at most 0.15 nats
    apart in the same measurements), while a node that computed some losses
    and guessed the others from them is off by each sequence's own distance
    from its guess (0.38 nats apart, with every difference under 0.5, in the
    attack's test). Raise both for runs whose nodes train in reduced
    precision on varied GPUs.

    A DiLoCo node's samples are computed in fp32 at the round's global
    parameters, which every peer and the keeper hold bit for bit, so honest
    losses differ from the verifier's only by floating-point order: at most
    5e-06 nats over 171 checks on CPU. ``diloco_tolerance`` replaces both
    tolerances there (each loss and the spread): 0.05 leaves room for GPUs'
    fp32 kernels (not measured here), while a loss guessed without the forward
    pass is rarely within it.

    The keeper keeps the files of the newest ``keep_checkpoints`` checkpoints
    (their hashes stay recorded after a file is removed); each file is about
    4 bytes per parameter, so lower it for large models on a small disk.

    Checkpoints are public, so a node could compute the losses of checkpointed
    steps and make up the rest. In a sync run the keeper's step follower also
    keeps, for a while, its parameters of a ``snapshot_fraction`` of the steps
    it followed (picked at random), which it never publishes; a spot check
    recomputes a sample of such a step whenever the receipt has one. A receipt
    picked for a spot check whose steps have neither is not credited
    (unverified): at 0.5, a receipt spanning two steps has none one time in four
    (7-17% of honest receipts in the verification bench), so the default keeps
    every step (the newest 16, each about 4 bytes per parameter on the
    coordinator's disk; lower it for large models).

    Trust is earned, as in BOINC's adaptive replication: while fewer than
    ``probation_checks`` of a peer's spot checks have passed since its last
    failed one (a new peer, or one caught), every receipt of it is spot-checked,
    whatever ``spot_check_fraction`` says (unless that is 0: spot checks off). A
    peer that makes up its receipts from the start is caught at its first
    checkable one; the fraction prices only established peers.
    """

    checkpoint_every_s: float = 60.0
    spot_check_fraction: float = 0.1
    spot_check_sequences: int = 4
    loss_tolerance: float = 0.5
    spread_tolerance: float = 0.25
    diloco_tolerance: float = 0.05
    keep_checkpoints: int = 8
    snapshot_fraction: float = 1.0
    probation_checks: int = 3


Aggregation = Literal["mean", "trimmed_mean", "centered_clip"]


@dataclass(frozen=True)
class TrustSection:
    """How each reducer combines the parts of its slice of an averaging round.

    ``"mean"`` is hivemind's weighted mean: one part scaled inside the guard's
    bounds (a sign flip times 9.9) moves it anywhere. ``"centered_clip"`` (the
    default; Karimireddy et al. 2021, run inside an all-reduce as BTARD does)
    starts from the coordinate-wise median of the parts and moves
    ``clip_iterations`` times towards their weighted mean, each part's pull
    clipped to ``clip_radius`` times the median distance of the parts from the
    centre: a part far from the others moves the result by at most that radius
    times its share of the weight. ``"trimmed_mean"`` drops, for each
    coordinate, the ``trim_fraction`` of highest and of lowest values (at least
    one of each from three parts on) and averages the rest, weighted. With two
    parts every rule is the mean: nobody can tell which of two is wrong. Under both
    robust rules a part's weight (the samples its sender says it accumulated) counts for
    at most ``max_weight_ratio`` times the median weight of the slice's parts: a sender
    claiming the allowed four target batches no longer takes most of the round.

    A sender most of whose parts of a reducer's slice lie more than
    ``report_distance`` clip radii from their results is reported, as a dropped part
    is: an honest part strays on one part of a slice now and then (its batch's own
    data), a hostile sender's on every part (see ``bench/robust.py`` in BENCHMARKS.md).
    """

    aggregation: Aggregation = "centered_clip"
    clip_iterations: int = 3
    clip_radius: float = 1.0
    trim_fraction: float = 0.2
    report_distance: float = 8.0
    max_weight_ratio: float = 2.0


@dataclass(frozen=True)
class RunSpec:
    """A whole run spec. Build it with :func:`parse_spec` or :func:`load_spec`."""

    run: RunSection
    model: ModelSection
    optimizer: OptimizerSection
    data: DataSection = field(default_factory=DataSection)
    swarm: SwarmSection = field(default_factory=SwarmSection)
    eval: EvalSection = field(default_factory=EvalSection)
    access: AccessSection = field(default_factory=AccessSection)
    verify: VerifySection = field(default_factory=VerifySection)
    trust: TrustSection = field(default_factory=TrustSection)

    def to_dict(self) -> dict[str, Any]:
        """All values, defaults included, as plain JSON-able types."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved spec."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "optimizer": OptimizerSection,
    "data": DataSection,
    "swarm": SwarmSection,
    "eval": EvalSection,
    "access": AccessSection,
    "verify": VerifySection,
    "trust": TrustSection,
}
_REQUIRED_SECTIONS = ("run", "model", "optimizer")


def load_spec(path: str | Path) -> RunSpec:
    """Read and validate a run spec file; raises :class:`SpecError` naming the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"run spec {path} does not exist; pass the path of a .toml run spec"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"run spec {path} cannot be read: {e}") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "run spec") -> RunSpec:
    """Parse and validate run spec TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    _check_keys(raw, _SECTIONS, source, where="")
    for name in _REQUIRED_SECTIONS:
        if name not in raw:
            raise SpecError(f"{source}: missing section [{name}]")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise SpecError(f"{source}: [{name}] must be a table, got {_describe(table)}")
        sections[name] = _build_section(cls, table, source, name)
    spec = RunSpec(**sections)
    _validate(spec, source)
    return spec


def _check_keys(table: dict, allowed: typing.Iterable[str], source: str, where: str) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            label = f"[{where}] {key}" if where else f"[{key}]"
            raise SpecError(
                f"{source}: unknown key {label}; {hint}expected one of: {', '.join(allowed)}"
            )


def _build_section(cls: type, table: dict, source: str, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(table, fields, source, where=name)
    values = {}
    for key, f in fields.items():
        if key in table:
            values[key] = _coerce(table[key], hints[key], f"{source}: [{name}] {key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{source}: missing key [{name}] {key} ({_type_name(hints[key])})")
    return cls(**values)


def _coerce(value: Any, hint: Any, label: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            options = " or ".join(repr(c) for c in choices)
            raise SpecError(f"{label} must be {options}, got {_describe(value)}")
        return value
    if origin is tuple and typing.get_args(hint)[-1] is Ellipsis:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise SpecError(f"{label} must be a list, got {_describe(value)}")
        return tuple(_coerce(v, item, label) for v in value)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list) or len(value) != len(args):
            raise SpecError(
                f"{label} must be a list of {len(args)} numbers, got {_describe(value)}"
            )
        return tuple(_coerce(v, a, label) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{label} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{label} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{label} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise SpecError(f"{label} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{label} must be a string, got {_describe(value)}")
        return value
    raise AssertionError(f"unsupported spec type {hint!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(hint))
    if isinstance(hint, types.GenericAlias):
        return "list"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(hint, str(hint))


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), "table" if isinstance(value, dict) else type(value).__name__
    )
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _validate(spec: RunSpec, source: str) -> None:
    """Cross-field checks; each names the key and what it must be."""

    def fail(key: str, message: str) -> typing.NoReturn:
        raise SpecError(f"{source}: {key} {message}")

    if not RUN_ID_PATTERN.match(spec.run.id):
        fail(
            "[run] id",
            f"must be 1-63 lowercase letters, digits, '-' or '_', got {spec.run.id!r}",
        )
    m = spec.model
    for key in ("vocab_size", "seq_len", "num_layers", "num_heads", "d_model", "mlp_ratio"):
        if getattr(m, key) < 1:
            fail(f"[model] {key}", f"must be at least 1, got {getattr(m, key)}")
    if m.vocab_size < 2:
        fail("[model] vocab_size", f"must be at least 2, got {m.vocab_size}")
    if m.d_model % m.num_heads:
        fail(
            "[model] d_model",
            f"must be divisible by num_heads ({m.num_heads}), got {m.d_model}",
        )
    if m.positions == "rotary" and (m.d_model // m.num_heads) % 2:
        fail("[model] d_model", "/ num_heads must be even for rotary positions")
    if not 0.0 <= m.dropout < 1.0:
        fail("[model] dropout", f"must be in [0, 1), got {m.dropout}")
    if spec.data.tokenizer == "byte" and m.vocab_size != 256:
        fail("[model] vocab_size", f"must be 256 for the byte tokenizer, got {m.vocab_size}")
    if spec.data.lease_s <= 0:
        fail("[data] lease_s", f"must be positive, got {spec.data.lease_s}")
    o = spec.optimizer
    if o.lr <= 0 or o.lr > 1:
        fail("[optimizer] lr", f"must be in (0, 1], got {o.lr}")
    if o.weight_decay < 0:
        fail("[optimizer] weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0 <= b < 1 for b in o.betas):
        fail("[optimizer] betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0:
        fail("[optimizer] warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.grad_clip < 0:
        fail("[optimizer] grad_clip", f"must be >= 0 (0 turns clipping off), got {o.grad_clip}")
    if o.micro_batch_size < 1:
        fail("[optimizer] micro_batch_size", f"must be at least 1, got {o.micro_batch_size}")
    if o.target_batch_size < o.micro_batch_size:
        fail(
            "[optimizer] target_batch_size",
            f"must be at least micro_batch_size ({o.micro_batch_size}), got {o.target_batch_size}",
        )
    if o.delay_grad_averaging and not o.delay_optimizer_step:
        fail(
            "[optimizer] delay_grad_averaging",
            "needs delay_optimizer_step = true (hivemind averages in the background only "
            "when the optimizer step runs there too)",
        )
    if o.inner_steps < 1:
        fail("[optimizer] inner_steps", f"must be at least 1, got {o.inner_steps}")
    if o.inner_batch_size < 1:
        fail("[optimizer] inner_batch_size", f"must be at least 1, got {o.inner_batch_size}")
    if o.mode == "diloco" and o.inner_batch_size > o.target_batch_size:
        fail(
            "[optimizer] inner_batch_size",
            f"must be at most target_batch_size ({o.target_batch_size}), got {o.inner_batch_size}",
        )
    if o.mode == "diloco" and o.state_compression != "none":
        fail(
            "[optimizer] state_compression",
            f"must be 'none' in diloco mode, got {o.state_compression!r}: peers stay in step "
            "by holding bit-identical global parameters, which a lossy download breaks",
        )
    if o.state_compression in ("8bit", "quantile-8bit"):
        fail(
            "[optimizer] state_compression",
            f"must be 'none' or 'fp16', got {o.state_compression!r}: 8-bit parameters lose "
            "too much for a joining peer to train on",
        )
    if not 0 < o.pseudo_grad_topk <= 1:
        fail("[optimizer] pseudo_grad_topk", f"must be in (0, 1], got {o.pseudo_grad_topk}")
    if not 0 < o.outer_lr <= 10:
        fail("[optimizer] outer_lr", f"must be in (0, 10], got {o.outer_lr}")
    if not 0 <= o.outer_momentum < 1:
        fail("[optimizer] outer_momentum", f"must be in [0, 1), got {o.outer_momentum}")
    s = spec.swarm
    for key in (
        "matchmaking_time_s",
        "averaging_timeout_s",
        "request_timeout_s",
        "metadata_expiration_s",
        "load_state_timeout_s",
    ):
        if getattr(s, key) <= 0:
            fail(f"[swarm] {key}", f"must be positive, got {getattr(s, key)}")
    if s.request_timeout_s >= s.matchmaking_time_s:
        fail(
            "[swarm] request_timeout_s",
            f"must be shorter than matchmaking_time_s ({s.matchmaking_time_s}), got "
            f"{s.request_timeout_s}: hivemind's matchmaking can deadlock otherwise",
        )
    if s.average_state_every < 1:
        fail("[swarm] average_state_every", f"must be at least 1, got {s.average_state_every}")
    if spec.eval.every_steps < 1:
        fail("[eval] every_steps", f"must be at least 1, got {spec.eval.every_steps}")
    if spec.eval.num_sequences < 1:
        fail("[eval] num_sequences", f"must be at least 1, got {spec.eval.num_sequences}")
    a = spec.access
    for key in a.allowlist:
        if not PUBLIC_KEY_PATTERN.match(key):
            fail(
                "[access] allowlist",
                f"entries must be 64 lowercase hex digits (an Ed25519 public key as "
                f"`crowdtrain-node identity` prints it), got {key!r}",
            )
    if a.mode == "allowlist" and not a.allowlist:
        fail("[access] allowlist", "must name at least one public key when mode = 'allowlist'")
    if a.mode != "allowlist" and a.allowlist:
        fail("[access] allowlist", f"is only read when mode = 'allowlist' (mode is {a.mode!r})")
    v = spec.verify
    if not 1.0 <= v.checkpoint_every_s <= 86_400.0:
        fail(
            "[verify] checkpoint_every_s",
            f"must be between 1 and 86400 seconds, got {v.checkpoint_every_s}",
        )
    if not 0.0 <= v.spot_check_fraction <= 1.0:
        fail(
            "[verify] spot_check_fraction",
            f"must be in [0, 1] (0 turns spot checks off), got {v.spot_check_fraction}",
        )
    if not 1 <= v.spot_check_sequences <= 8:
        fail(
            "[verify] spot_check_sequences",
            f"must be 1 to 8 (sequences recomputed per spot check), got {v.spot_check_sequences}",
        )
    if not 0.0 < v.loss_tolerance <= 10.0:
        fail("[verify] loss_tolerance", f"must be in (0, 10] nats, got {v.loss_tolerance}")
    if not 0.0 < v.spread_tolerance <= 10.0:
        fail("[verify] spread_tolerance", f"must be in (0, 10] nats, got {v.spread_tolerance}")
    if not 0.0 < v.diloco_tolerance <= 10.0:
        fail("[verify] diloco_tolerance", f"must be in (0, 10] nats, got {v.diloco_tolerance}")
    if not 0.0 <= v.snapshot_fraction <= 1.0:
        fail(
            "[verify] snapshot_fraction",
            f"must be in [0, 1] (the share of sync steps the keeper keeps privately for spot "
            f"checks; 0 leaves only the public checkpoints), got {v.snapshot_fraction}",
        )
    if not 0 <= v.probation_checks <= 1000:
        fail(
            "[verify] probation_checks",
            f"must be 0 to 1000 (passed spot checks before a peer's receipts are checked "
            f"at spot_check_fraction; 0: from the start), got {v.probation_checks}",
        )
    if not 1 <= v.keep_checkpoints <= 10_000:
        fail(
            "[verify] keep_checkpoints",
            f"must be 1 to 10000 (files of the newest checkpoints the keeper keeps; "
            f"spot checks need the recent ones), got {v.keep_checkpoints}",
        )
    t = spec.trust
    if not 1 <= t.clip_iterations <= 20:
        fail(
            "[trust] clip_iterations",
            f"must be 1 to 20 (CenteredClip's steps towards the clipped mean), "
            f"got {t.clip_iterations}",
        )
    if not 0.0 < t.clip_radius <= 100.0:
        fail(
            "[trust] clip_radius",
            f"must be in (0, 100] (times the parts' median distance from the centre), "
            f"got {t.clip_radius}",
        )
    if not 0.0 <= t.trim_fraction < 0.5:
        fail(
            "[trust] trim_fraction",
            f"must be in [0, 0.5) (the share of highest and of lowest values dropped per "
            f"coordinate), got {t.trim_fraction}",
        )
    if not 1.0 <= t.max_weight_ratio <= 1000.0:
        fail(
            "[trust] max_weight_ratio",
            f"must be in [1, 1000] (times the median weight a part may count for), "
            f"got {t.max_weight_ratio}",
        )
    if not 1.0 <= t.report_distance <= 1000.0:
        fail(
            "[trust] report_distance",
            f"must be in [1, 1000] clip radii (parts further from the result are reported), "
            f"got {t.report_distance}",
        )
