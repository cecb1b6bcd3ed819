"""Hardware choices on CPU: micro-batch under a memory cap, autocast, compile fallback, throttle."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
import torch

from crowdtrain.model import GPT, GPTConfig
from crowdtrain.node.device.hooks import MEMORY_CAP_ENV, SLOWDOWN_ENV, TestHooks, Throttle
from crowdtrain.node.device.micro_batch import choose_micro_batch, estimate_sequence_bytes
from crowdtrain.node.device.precision import autocast, maybe_compile
from crowdtrain.protocol.errors import CrowdtrainError

CONFIG = GPTConfig(vocab_size=256, seq_len=32, num_layers=2, num_heads=2, d_model=32)
MiB = 2**20


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def _choose(model: GPT, cap: int | None, upper: int = 64, default: int = 4):
    return choose_micro_batch(
        model,
        "cpu",
        seq_len=CONFIG.seq_len,
        vocab_size=CONFIG.vocab_size,
        upper=upper,
        default=default,
        memory_cap_bytes=cap,
    )


def test_cpu_without_cap_uses_the_spec_default(model: GPT, monkeypatch) -> None:
    monkeypatch.delenv(MEMORY_CAP_ENV, raising=False)
    choice = _choose(model, None, default=4)
    assert choice.size == 4
    assert choice.bytes_per_sequence is None and "micro_batch_size" in choice.reason
    assert _choose(model, None, upper=3, default=4).size == 3


def test_smaller_cap_gives_smaller_micro_batch(model: GPT) -> None:
    sizes = [_choose(model, cap).size for cap in (16 * MiB, 6 * MiB, 3 * MiB)]
    assert sizes[0] > sizes[1] > sizes[2] >= 1
    choice = _choose(model, 6 * MiB)
    # What it chose fits the budget by its own measure.
    per_sequence, fixed = estimate_sequence_bytes(
        model, "cpu", seq_len=CONFIG.seq_len, vocab_size=CONFIG.vocab_size
    )
    assert choice.budget_bytes == int(6 * MiB * 0.85)
    assert fixed + choice.size * per_sequence <= choice.budget_bytes
    assert fixed + (choice.size + 1) * per_sequence > choice.budget_bytes


def test_upper_bound_respected(model: GPT) -> None:
    choice = _choose(model, 1 << 30, upper=5)
    assert choice.size == 5 and "per-step batch" in choice.reason


def test_too_small_cap_says_what_is_needed(model: GPT) -> None:
    with pytest.raises(CrowdtrainError, match=r"needs about .* to train even one sequence"):
        _choose(model, 100_000)


def test_cap_from_env_warns(model: GPT, monkeypatch, caplog) -> None:
    monkeypatch.setenv(MEMORY_CAP_ENV, str(3 * MiB))
    with caplog.at_level(logging.WARNING):
        capped = _choose(model, TestHooks.from_env().memory_cap_bytes)
    assert capped.size < 64 and capped.budget_bytes == int(3 * MiB * 0.85)
    assert MEMORY_CAP_ENV in caplog.text and "TEST HOOK" in caplog.text
    monkeypatch.setenv(MEMORY_CAP_ENV, "lots")
    with pytest.raises(CrowdtrainError, match=MEMORY_CAP_ENV):
        _choose(model, TestHooks.from_env().memory_cap_bytes)


def test_estimate_grows_with_sequence_length() -> None:
    torch.manual_seed(0)
    long = GPT(GPTConfig(vocab_size=256, seq_len=64, num_layers=2, num_heads=2, d_model=32))
    short_bytes, _ = estimate_sequence_bytes(long, "cpu", seq_len=32, vocab_size=256)
    long_bytes, _ = estimate_sequence_bytes(long, "cpu", seq_len=64, vocab_size=256)
    assert 1.8 < long_bytes / short_bytes < 2.5


def test_autocast_is_a_no_op_on_cpu(model: GPT) -> None:
    context = autocast("cpu")
    assert isinstance(context, contextlib.nullcontext)
    with context:
        logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.dtype == torch.float32


def test_compile_off_returns_model_unchanged(model: GPT) -> None:
    assert maybe_compile(model, False) is model


def test_compile_failure_falls_back_to_eager(model: GPT, monkeypatch, caplog) -> None:
    def broken_compile(self, *args, **kwargs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        same = maybe_compile(model, True, example_batch=(2, CONFIG.seq_len, CONFIG.vocab_size))
    assert same is model and "torch.compile failed" in caplog.text
    assert "no C compiler here" in caplog.text
    logits, _ = same(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, CONFIG.vocab_size)


def test_throttle_sleeps_factor_minus_one_times_compute() -> None:
    slept: list[float] = []
    assert Throttle(2.5).wrap(0.2, sleep=slept.append) == pytest.approx(0.3)
    assert slept == [pytest.approx(0.3)]
    assert Throttle(1.0).wrap(0.2, sleep=slept.append) == 0.0 and len(slept) == 1
    started = time.perf_counter()
    with Throttle(2.0).timed():
        time.sleep(0.05)
    assert 0.1 <= time.perf_counter() - started < 0.3


def test_throttle_from_env(monkeypatch, caplog) -> None:
    monkeypatch.delenv(SLOWDOWN_ENV, raising=False)
    assert not Throttle(TestHooks.from_env().slowdown).active
    monkeypatch.setenv(SLOWDOWN_ENV, "2")
    with caplog.at_level(logging.WARNING):
        throttle = Throttle(TestHooks.from_env().slowdown)
    assert throttle.active and throttle.factor == 2.0
    assert SLOWDOWN_ENV in caplog.text and "TEST HOOK" in caplog.text
    for bad in ("0.5", "fast"):
        monkeypatch.setenv(SLOWDOWN_ENV, bad)
        with pytest.raises(CrowdtrainError, match=SLOWDOWN_ENV):
            TestHooks.from_env()


def test_hooks_are_read_once_from_the_environment_given(monkeypatch, caplog) -> None:
    for name in ("CROWDTRAIN_TEST_ATTACK", "CROWDTRAIN_TEST_INF_GRAD_EVERY", MEMORY_CAP_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(SLOWDOWN_ENV, raising=False)
    assert TestHooks.from_env() == TestHooks()  # an ordinary node, and nothing logged
    assert "TEST HOOK" not in caplog.text
    env = {
        "CROWDTRAIN_TEST_ATTACK": "cycle",
        "CROWDTRAIN_TEST_INF_GRAD_EVERY": "4",
        SLOWDOWN_ENV: "1.5",
        MEMORY_CAP_ENV: "4e9",
    }
    with caplog.at_level(logging.WARNING):
        hooks = TestHooks.from_env(env)
    assert hooks == TestHooks("cycle", 4, 1.5, 4_000_000_000)
    assert all(name in caplog.text for name in env)
