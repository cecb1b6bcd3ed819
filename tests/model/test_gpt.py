"""The GPT's contract: shapes, loss at init, causality, init, training, generation, config."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from crowdtrain.model import GPT, GPTConfig, estimate_flops_per_token


def test_forward_returns_logits_and_loss(model: GPT) -> None:
    idx = torch.randint(0, 256, (3, 32))
    logits, loss = model(idx, torch.randint(0, 256, (3, 32)))
    assert logits.shape == (3, 32, 256)
    assert loss is not None and loss.shape == ()

    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, 256)
    assert loss is None


def test_loss_at_init_is_close_to_uniform(model: GPT) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (8, 32))
    _, loss = model(idx, torch.randint(0, 256, (8, 32)))
    assert abs(loss.item() - math.log(256)) < 0.3


def test_future_tokens_do_not_change_past_logits(model: GPT) -> None:
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 20:], before[:, 20:])


def test_positions_matter(model: GPT) -> None:
    # Without position information a model cannot tell "ab" from "ba" at the last token.
    logits_ab, _ = model(torch.tensor([[1, 2, 3]]))
    logits_ba, _ = model(torch.tensor([[2, 1, 3]]))
    assert not torch.allclose(logits_ab[0, -1], logits_ba[0, -1])


def test_rotary_has_no_position_parameters(tiny_config: Callable[..., GPTConfig]) -> None:
    rotary = GPT(tiny_config(positions="rotary"))
    learned = GPT(tiny_config(positions="learned"))
    assert not any("position" in name or "rotary" in name for name in rotary.state_dict())
    assert "position_embedding.weight" in learned.state_dict()
    assert learned.num_parameters() - rotary.num_parameters() == 32 * 32


def test_lm_head_is_tied_to_token_embedding(model: GPT) -> None:
    assert model.lm_head.weight is model.token_embedding.weight


def test_init_is_deterministic_given_seed(config: GPTConfig) -> None:
    torch.manual_seed(7)
    first = GPT(config).state_dict()
    torch.manual_seed(7)
    second = GPT(config).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_residual_projections_start_smaller(tiny_config: Callable[..., GPTConfig]) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(d_model=256, num_heads=4))
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert qkv_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)


def test_input_longer_than_seq_len_is_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_num_parameters_counts_tied_weights_once(model: GPT) -> None:
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))
    embeddings = 256 * 32 + (32 * 32 if model.position_embedding is not None else 0)
    assert model.num_parameters(non_embedding=True) == model.num_parameters() - embeddings


def test_flops_per_token_matches_hand_calculation(tiny_config: Callable[..., GPTConfig]) -> None:
    config = tiny_config()
    # 2 layers x (4 + 2*4) x 32^2 matmul weights, plus the 32 x 256 lm_head.
    matmul_weights = 2 * 12 * 32 * 32 + 32 * 256
    attention = 12 * 2 * 32 * 32
    assert matmul_weights == 32_768
    assert estimate_flops_per_token(config) == 6 * 32_768 + attention == 221_184


@pytest.mark.parametrize("positions", ["rotary", "learned"])
@pytest.mark.parametrize("mlp_ratio", [2, 4])
def test_flops_per_token_counts_every_matmul_of_the_model(
    tiny_config: Callable[..., GPTConfig], positions: str, mlp_ratio: int
) -> None:
    config = tiny_config(positions=positions, mlp_ratio=mlp_ratio, num_layers=3)
    with torch.device("meta"):
        model = GPT(config)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * config.num_layers * config.d_model * config.seq_len
    assert estimate_flops_per_token(config) == 6 * linear_weights + attention


def test_flops_per_token_scale_with_parameters(tiny_config: Callable[..., GPTConfig]) -> None:
    def flops_and_params(num_layers: int, d_model: int) -> tuple[float, int]:
        config = tiny_config(num_layers=num_layers, d_model=d_model, num_heads=4)
        with torch.device("meta"):
            params = GPT(config).num_parameters(non_embedding=True)
        return estimate_flops_per_token(config), params

    small_flops, small_params = flops_and_params(4, 512)
    for num_layers, d_model in [(8, 512), (4, 1024), (16, 1024)]:
        flops, params = flops_and_params(num_layers, d_model)
        assert flops / small_flops == pytest.approx(params / small_params, rel=0.05)


def test_adamw_on_one_batch_drives_loss_down(model: GPT) -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_appends_tokens_beyond_seq_len(model: GPT) -> None:
    prompt = torch.randint(0, 256, (2, 30))
    out = model.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=5)
    assert out.shape == (2, 40)
    assert torch.equal(out[:, :30], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 256


def test_generate_greedy_equals_top_1(model: GPT) -> None:
    prompt = torch.randint(0, 256, (2, 4))
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    top_1 = model.generate(prompt, max_new_tokens=6, top_k=1)
    assert torch.equal(greedy, top_1)


def test_generate_restores_train_mode(model: GPT) -> None:
    model.train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2)
    assert model.training


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"seq_len": -1}, "seq_len"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"num_heads": True}, "num_heads"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"d_model": 30, "num_heads": 4}, "d_model"),
        ({"d_model": 6, "num_heads": 2}, "d_model"),
        ({"positions": "alibi"}, "positions"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_errors_name_the_field(
    tiny_config: Callable[..., GPTConfig], overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        tiny_config(**overrides)


def test_odd_head_dim_is_fine_with_learned_positions(tiny_config: Callable[..., GPTConfig]) -> None:
    assert tiny_config(d_model=6, num_heads=2, positions="learned").head_dim == 3


def test_the_run_spec_model_section_is_gptconfig_field_for_field() -> None:
    """The spec's [model] keys are GPTConfig's fields, with the same defaults: a key
    added to one and not the other fails here, not in a run."""
    from dataclasses import MISSING, fields

    from crowdtrain.protocol.runspec import ModelSection

    def shape(cls: type) -> list[tuple[str, object]]:
        return [(f.name, f.default if f.default is not MISSING else None) for f in fields(cls)]

    assert shape(ModelSection) == shape(GPTConfig)
    section = ModelSection(vocab_size=300, seq_len=32, num_layers=3, num_heads=2, d_model=16)
    assert GPTConfig.from_spec(section) == GPTConfig(
        vocab_size=300, seq_len=32, num_layers=3, num_heads=2, d_model=16
    )
