from pathlib import Path

import pytest

from crowdtrain.protocol.errors import SpecError
from crowdtrain.protocol.runspec import RunSpec, load_spec, parse_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stdlib-tiny.toml"

MINIMAL = """
[run]
id = "tiny"

[model]
vocab_size = 256
seq_len = 32
num_layers = 2
num_heads = 2
d_model = 16

[optimizer]
target_batch_size = 16
"""


def _spec_text(**sections: dict) -> str:
    """The minimal spec with keys of ``sections`` replaced (a value of None drops the key)."""
    tables = {
        "run": {"id": '"tiny"'},
        "model": {
            "vocab_size": "256",
            "seq_len": "32",
            "num_layers": "2",
            "num_heads": "2",
            "d_model": "16",
        },
        "optimizer": {"target_batch_size": "16"},
    }
    for name, changes in sections.items():
        table = tables.setdefault(name, {})
        for key, value in changes.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
        for name, table in tables.items()
    )


def _error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="spec.toml")
    message = str(info.value)
    assert message.startswith("spec.toml: ")
    return message


def test_example_spec_loads():
    spec = load_spec(EXAMPLE)
    assert isinstance(spec, RunSpec)
    assert spec.run.id == "stdlib-tiny"
    assert (spec.model.vocab_size, spec.model.seq_len, spec.model.d_model) == (256, 128, 192)
    assert spec.data.lease_s == 600.0 and isinstance(spec.data.lease_s, float)
    assert spec.optimizer.warmup_steps == 20
    # Keys the file leaves out get their defaults.
    assert spec.optimizer.betas == (0.9, 0.95)
    assert spec.model.mlp_ratio == 4
    assert spec.swarm.load_state_timeout_s == 60.0


def test_minimal_spec_fills_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.run.description == "" and spec.run.seed == 0
    assert spec.model.positions == "rotary" and spec.model.dropout == 0.0
    assert spec.data.tokenizer == "byte" and spec.data.lease_s == 600.0
    assert spec.optimizer.mode == "sync"
    assert spec.optimizer.lr == 3e-3 and spec.optimizer.micro_batch_size == 16
    assert spec.swarm.matchmaking_time_s == 3.0
    assert spec.verify.keep_checkpoints == 8
    assert (spec.eval.every_steps, spec.eval.num_sequences) == (5, 64)
    assert spec.to_dict()["optimizer"]["betas"] == [0.9, 0.95]


def test_integer_is_accepted_where_a_number_is_expected():
    spec = parse_spec(_spec_text(optimizer={"lr": "1"}, data={"lease_s": "30"}))
    assert spec.optimizer.lr == 1.0 and isinstance(spec.optimizer.lr, float)
    assert spec.data.lease_s == 30.0


def test_hash_is_stable_and_ignores_formatting():
    spec = parse_spec(MINIMAL)
    assert spec.hash == parse_spec(MINIMAL).hash
    assert len(spec.hash) == 64
    reordered = """
# the same run, written differently
[optimizer]
target_batch_size    =   16   # sequences

[model]
d_model = 16
num_heads = 2
num_layers = 2
seq_len = 32
vocab_size = 256

[run]
id = 'tiny'
"""
    assert parse_spec(reordered).hash == spec.hash


def test_hash_covers_defaults_written_out():
    explicit = _spec_text(
        optimizer={"lr": "0.003", "betas": "[0.9, 0.95]"}, data={"lease_s": "600"}
    )
    assert parse_spec(explicit).hash == parse_spec(MINIMAL).hash


@pytest.mark.parametrize(
    "changes",
    [
        {"run": {"seed": "1"}},
        {"run": {"description": '"other"'}},
        {"model": {"num_layers": "3"}},
        {"optimizer": {"lr": "0.002"}},
        {"eval": {"every_steps": "6"}},
    ],
)
def test_hash_changes_with_any_value(changes):
    assert parse_spec(_spec_text(**changes)).hash != parse_spec(MINIMAL).hash


def test_unknown_section():
    message = _error(MINIMAL + "\n[modle]\nx = 1\n")
    assert "unknown key [modle]" in message
    assert "did you mean 'model'?" in message


def test_typo_key_suggests_close_match():
    message = _error(_spec_text(optimizer={"lrr": "0.01"}))
    assert "unknown key [optimizer] lrr" in message
    assert "did you mean 'lr'?" in message
    assert "target_batch_size" in message  # lists what is allowed


def test_unknown_key_without_close_match_lists_choices():
    message = _error(_spec_text(run={"zzzzzz": "1"}))
    assert "unknown key [run] zzzzzz" in message
    assert "did you mean" not in message
    assert "expected one of: id, description, seed" in message


@pytest.mark.parametrize("section", ["run", "model", "optimizer"])
def test_missing_required_section(section):
    blocks = _spec_text().split("\n\n")
    text = "\n\n".join(b for b in blocks if not b.startswith(f"[{section}]"))
    message = _error(text)
    assert f"missing section [{section}]" in message


@pytest.mark.parametrize(
    "section, key, kind",
    [
        ("run", "id", "string"),
        ("model", "d_model", "integer"),
        ("optimizer", "target_batch_size", "integer"),
    ],
)
def test_missing_required_key(section, key, kind):
    message = _error(_spec_text(**{section: {key: None}}))
    assert f"missing key [{section}] {key} ({kind})" in message


def test_section_that_is_not_a_table():
    message = _error("eval = 3\n" + _spec_text())
    assert "[eval] must be a table, got integer 3" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"optimizer": {"lr": '"0.01"'}}, "[optimizer] lr must be a number, got string '0.01'"),
        ({"model": {"d_model": "16.0"}}, "[model] d_model must be an integer, got number 16.0"),
        ({"model": {"num_layers": "true"}}, "[model] num_layers must be an integer, got boolean"),
        ({"optimizer": {"lr": "true"}}, "[optimizer] lr must be a number, got boolean"),
        ({"run": {"id": "7"}}, "[run] id must be a string, got integer 7"),
        ({"run": {"seed": '"0"'}}, "[run] seed must be an integer, got string '0'"),
        (
            {"optimizer": {"betas": "[0.9]"}},
            "[optimizer] betas must be a list of 2 numbers, got list [0.9]",
        ),
        (
            {"optimizer": {"betas": "[0.9, 0.95, 0.99]"}},
            "[optimizer] betas must be a list of 2 numbers",
        ),
        (
            {"optimizer": {"betas": "0.9"}},
            "[optimizer] betas must be a list of 2 numbers, got number 0.9",
        ),
        ({"optimizer": {"betas": '[0.9, "x"]'}}, "[optimizer] betas must be a number, got string"),
        (
            {"model": {"positions": '"alibi"'}},
            "[model] positions must be 'rotary' or 'learned', got string 'alibi'",
        ),
        (
            {"optimizer": {"mode": '"async"'}},
            "[optimizer] mode must be 'sync' or 'diloco', got string 'async'",
        ),
        (
            {"data": {"tokenizer": '"wordpiece"'}},
            "[data] tokenizer must be 'byte' or 'bpe', got string 'wordpiece'",
        ),
    ],
)
def test_wrong_types_name_key_and_expectation(changes, expected):
    assert expected in _error(_spec_text(**changes))


@pytest.mark.parametrize(
    "changes, expected",
    [
        (
            {"model": {"d_model": "18", "num_heads": "4"}},
            "[model] d_model must be divisible by num_heads (4), got 18",
        ),
        (
            {"model": {"d_model": "18", "num_heads": "2"}},
            "[model] d_model / num_heads must be even for rotary positions",
        ),
        (
            {"model": {"vocab_size": "512"}},
            "[model] vocab_size must be 256 for the byte tokenizer, got 512",
        ),
        (
            {"optimizer": {"target_batch_size": "8", "micro_batch_size": "16"}},
            "[optimizer] target_batch_size must be at least micro_batch_size (16), got 8",
        ),
        ({"run": {"id": '"My Run"'}}, "[run] id must be 1-63 lowercase letters"),
        ({"run": {"id": '""'}}, "[run] id must be 1-63 lowercase letters"),
        ({"run": {"id": '"-leading-dash"'}}, "[run] id must be 1-63 lowercase letters"),
        ({"run": {"id": '"' + "a" * 64 + '"'}}, "[run] id must be 1-63 lowercase letters"),
        ({"swarm": {"averaging_timeout_s": "0"}}, "[swarm] averaging_timeout_s must be positive"),
        ({"swarm": {"request_timeout_s": "-1.5"}}, "[swarm] request_timeout_s must be positive"),
        ({"swarm": {"average_state_every": "0"}}, "[swarm] average_state_every must be at least 1"),
        (
            {"swarm": {"matchmaking_time_s": "1.0", "request_timeout_s": "1.0"}},
            "[swarm] request_timeout_s must be shorter than matchmaking_time_s (1.0)",
        ),
        ({"data": {"lease_s": "0"}}, "[data] lease_s must be positive"),
        ({"model": {"dropout": "1.0"}}, "[model] dropout must be in [0, 1)"),
        ({"optimizer": {"lr": "0"}}, "[optimizer] lr must be in (0, 1]"),
        ({"optimizer": {"betas": "[0.9, 1.0]"}}, "[optimizer] betas must be two numbers in [0, 1)"),
        ({"eval": {"num_sequences": "0"}}, "[eval] num_sequences must be at least 1"),
        ({"model": {"num_heads": "0"}}, "[model] num_heads must be at least 1, got 0"),
        (
            {"optimizer": {"delay_grad_averaging": "true"}},
            "[optimizer] delay_grad_averaging needs delay_optimizer_step = true",
        ),
        ({"optimizer": {"inner_steps": "0"}}, "[optimizer] inner_steps must be at least 1"),
        (
            {"optimizer": {"mode": '"diloco"', "inner_batch_size": "1000"}},
            "[optimizer] inner_batch_size must be at most target_batch_size",
        ),
        ({"optimizer": {"outer_lr": "0"}}, "[optimizer] outer_lr must be in (0, 10]"),
        (
            {"optimizer": {"mode": '"diloco"', "state_compression": '"fp16"'}},
            "[optimizer] state_compression must be 'none' in diloco mode",
        ),
        (
            {"optimizer": {"state_compression": '"8bit"'}},
            "[optimizer] state_compression must be 'none' or 'fp16', got '8bit'",
        ),
        ({"optimizer": {"outer_momentum": "1.0"}}, "[optimizer] outer_momentum must be in [0, 1)"),
        (
            {"optimizer": {"pseudo_grad_compression": '"3bit"'}},
            "[optimizer] pseudo_grad_compression must be 'none' or 'fp16' or '8bit' or "
            "'quantile-8bit' or '4bit' or '2bit' or 'topk-4bit' or 'topk-2bit', got string "
            "'3bit'",
        ),
        (
            {"verify": {"keep_checkpoints": "0"}},
            "[verify] keep_checkpoints must be 1 to 10000",
        ),
        (
            {"verify": {"keep_checkpoints": "100000"}},
            "[verify] keep_checkpoints must be 1 to 10000",
        ),
        (
            {"trust": {"aggregation": '"median"'}},
            "[trust] aggregation must be 'mean' or 'trimmed_mean' or 'centered_clip'",
        ),
        ({"trust": {"clip_iterations": "0"}}, "[trust] clip_iterations must be 1 to 20"),
        ({"trust": {"clip_radius": "0"}}, "[trust] clip_radius must be in (0, 100]"),
        ({"trust": {"trim_fraction": "0.5"}}, "[trust] trim_fraction must be in [0, 0.5)"),
        ({"trust": {"report_distance": "0.5"}}, "[trust] report_distance must be in [1, 1000]"),
        ({"trust": {"max_weight_ratio": "0.5"}}, "[trust] max_weight_ratio must be in [1, 1000]"),
    ],
)
def test_cross_field_checks(changes, expected):
    assert expected in _error(_spec_text(**changes))


def test_odd_head_dim_is_fine_with_learned_positions():
    spec = parse_spec(
        _spec_text(model={"d_model": "18", "num_heads": "2", "positions": '"learned"'})
    )
    assert spec.model.d_model // spec.model.num_heads == 9


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"optimizer": {"lr": "nan"}}, "[optimizer] lr"),
        ({"data": {"lease_s": "nan"}}, "[data] lease_s"),
        ({"swarm": {"averaging_timeout_s": "nan"}}, "[swarm] averaging_timeout_s"),
    ],
)
def test_nan_values_are_refused(changes, key):
    assert key in _error(_spec_text(**changes))


def test_invalid_toml():
    message = _error(MINIMAL + "\n[model\n")
    assert "not valid TOML" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError, match="does not exist") as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_load_spec_names_the_file_in_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_spec_text(optimizer={"lrr": "0.01"}), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: unknown key [optimizer] lrr")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace('"tiny"', '"tiny"\ndescription = "caf\xe9"').encode("latin-1"))
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(path)


def _with_access(table: str) -> str:
    return (
        '[run]\nid = "r"\n[model]\nvocab_size = 256\nseq_len = 8\nnum_layers = 1\n'
        "num_heads = 1\nd_model = 8\n[optimizer]\ntarget_batch_size = 16\n" + table
    )


def test_access_defaults_to_open():
    assert parse_spec(_with_access("")).access.mode == "open"


def test_allowlist_is_parsed_as_a_tuple_of_keys():
    key = "ab" * 32
    spec = parse_spec(_with_access(f'[access]\nmode = "allowlist"\nallowlist = ["{key}"]\n'))
    assert spec.access.allowlist == (key,)
    assert spec.to_dict()["access"]["allowlist"] == [key]


@pytest.mark.parametrize(
    "table, expected",
    [
        ('[access]\nmode = "allowlist"\n', "must name at least one public key"),
        ('[access]\nmode = "allowlist"\nallowlist = ["nothex"]\n', "64 lowercase hex"),
        ('[access]\nmode = "allowlist"\nallowlist = "ab"\n', "must be a list"),
        ('[access]\nmode = "allowlist"\nallowlist = [1]\n', "must be a string"),
        (f'[access]\nallowlist = ["{"ab" * 32}"]\n', "only read when mode = 'allowlist'"),
        ('[access]\nmode = "closed"\n', "must be 'open' or 'invite' or 'allowlist'"),
        ('[access]\nmodes = "open"\n', "did you mean 'mode'"),
    ],
)
def test_bad_access_sections_are_refused(table, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(_with_access(table))


def test_shipped_examples_parse():
    """Both example specs are valid, and the diloco one is what the README promises."""
    root = Path(__file__).resolve().parents[2] / "examples"
    assert load_spec(root / "stdlib-tiny.toml").optimizer.mode == "sync"
    diloco = load_spec(root / "stdlib-diloco.toml")
    assert diloco.run.id == "stdlib-diloco"
    assert diloco.optimizer.mode == "diloco"
    assert diloco.optimizer.inner_steps == 100
    assert diloco.optimizer.pseudo_grad_compression == "8bit"
