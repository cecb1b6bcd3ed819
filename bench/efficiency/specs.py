"""The run specs the efficiency bench trains: the demo's specs, edited and written back.

Owns which spec a figure trains (examples/stdlib-tiny.toml for sync,
examples/stdlib-diloco.toml for diloco), the overrides a part applies, and
the GPT that a spec describes. Knows nothing about processes or data.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from bench.efficiency import ROOT

EXAMPLES = ROOT / "examples"


def load_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(spec: dict[str, Any]) -> str:
    """A spec of flat tables (what run specs are) as TOML text."""
    lines: list[str] = []
    for section, table in spec.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def diloco_spec() -> tuple[dict[str, Any], str]:
    """The diloco run spec (examples/stdlib-diloco.toml), and where it came from.

    Until that file lands, the demo spec with the issue's diloco settings stands in.
    """
    path = EXAMPLES / "stdlib-diloco.toml"
    if path.exists():
        return load_toml(path), "examples/stdlib-diloco.toml"
    spec = load_toml(EXAMPLES / "stdlib-tiny.toml")
    spec["run"]["id"] = "stdlib-diloco"
    spec["optimizer"].update(
        mode="diloco",
        inner_steps=100,
        inner_batch_size=16,
        target_batch_size=64,
        pseudo_grad_compression="8bit",
    )
    return (
        spec,
        "examples/stdlib-tiny.toml with the issue's diloco settings (no stdlib-diloco.toml)",
    )


def sync_spec() -> tuple[dict[str, Any], str]:
    return load_toml(EXAMPLES / "stdlib-tiny.toml"), "examples/stdlib-tiny.toml"


def with_overrides(spec: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with some keys of some sections replaced."""
    out = {name: dict(table) for name, table in spec.items()}
    for name, table in sections.items():
        out.setdefault(name, {}).update(table)
    return out


def gpt_config(spec: dict[str, Any]) -> Any:
    from crowdtrain.model import GPTConfig

    m = spec["model"]
    return GPTConfig(
        vocab_size=m["vocab_size"],
        seq_len=m["seq_len"],
        num_layers=m["num_layers"],
        num_heads=m["num_heads"],
        d_model=m["d_model"],
        mlp_ratio=m.get("mlp_ratio", 4),
        positions=m.get("positions", "rotary"),
        dropout=m.get("dropout", 0.0),
    )
