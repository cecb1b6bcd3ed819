"""Run specs for tests: one tiny run, and the few keys each test changes.

:func:`tiny_spec` is the run the real-process tests train (a 2-layer byte-level
GPT, short swarm timeouts for loopback); :func:`small_spec` is the smaller
shape the unit tests of the coordinator and the optimizers use, without the
sections they never read. A test states only what it changes, so a reader sees
at once what is special about its run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Section = dict[str, Any]

TINY: dict[str, Section] = {
    "run": {"id": "tiny", "seed": 1},
    "model": {"vocab_size": 256, "seq_len": 64, "num_layers": 2, "num_heads": 2, "d_model": 64},
    "data": {"tokenizer": "byte", "lease_s": 600.0},
    "optimizer": {"target_batch_size": 32, "micro_batch_size": 8, "lr": 0.005, "warmup_steps": 2},
    "swarm": {
        "matchmaking_time_s": 1.0,
        "averaging_timeout_s": 10.0,
        "request_timeout_s": 0.5,
        "metadata_expiration_s": 10.0,
    },
    "eval": {"every_steps": 2, "num_sequences": 32},
}

# What small_spec changes of TINY: a smaller model and batch, and no [data], [swarm] or
# [eval] section (their defaults hold).
SMALL: dict[str, Section | None] = {
    "model": {"seq_len": 32, "d_model": 16},
    "optimizer": {"target_batch_size": 16, "micro_batch_size": 4, "lr": None, "warmup_steps": None},
    "data": None,
    "swarm": None,
    "eval": None,
}


TINY_DILOCO: Section = {
    # A round every 5 inner steps of 8 sequences on each of 2 peers (80 sequences in all).
    "mode": "diloco",
    "target_batch_size": 16,
    "inner_batch_size": 8,
    "micro_batch_size": 8,
    "inner_steps": 5,
    "lr": 0.005,
    "warmup_steps": 2,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
}
"""The tiny run's ``[optimizer]`` in DiLoCo mode, for end-to-end tests."""


def tiny_spec(**sections: Section | None) -> str:
    """TOML of :data:`TINY` with each named section's keys updated by the keyword of its
    name (``model={"seq_len": 32}``); a key given as None is left out, a section given
    as None is left out, and a section TINY lacks (``verify``) is added."""
    return _toml(_merge(TINY, sections))


def small_spec(**sections: Section | None) -> str:
    """:func:`tiny_spec` of the unit tests' smaller run (TINY changed by :data:`SMALL`),
    then ``sections`` (a section SMALL leaves out starts empty)."""
    return _toml(_merge(_merge(TINY, SMALL), sections))


def write_tiny_spec(path: Path, **sections: Section | None) -> Path:
    path.write_text(tiny_spec(**sections), encoding="utf-8")
    return path


def _merge(base: dict[str, Section], sections: dict[str, Section | None]) -> dict[str, Section]:
    merged = {name: dict(keys) for name, keys in base.items()}
    for name, keys in sections.items():
        if keys is None:
            merged.pop(name, None)
            continue
        section = merged.setdefault(name, {})
        for key, value in keys.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    return merged


def _toml(spec: dict[str, Section]) -> str:
    return "\n".join(_section(name, keys) for name, keys in spec.items())


def _section(name: str, keys: Section) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {_value(value)}\n" for key, value in keys.items())


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the ASCII values tests use
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r} in a test spec")
