"""The GPT decoder that a run trains, its config, and its compute estimate.

Owns the architecture (``GPTConfig``, ``GPT``), the language-model loss (over
all tokens, or per sequence) and ``estimate_flops_per_token``. Knows nothing
about data, optimizers, devices beyond the tensors it is given, files or
networking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

ROTARY_BASE = 10_000.0
"""Base of the rotary frequencies, as in RoFormer and LLaMA."""

INIT_STD = 0.02
"""Standard deviation of every weight at init (GPT-2)."""

_POSITIONS = ("rotary", "learned")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT; two models with equal configs have equal state dict keys and shapes.

    ``positions`` is ``"rotary"`` (rotary embeddings on queries and keys, no
    position parameters) or ``"learned"`` (a GPT-2 style table of ``seq_len``
    position vectors). ``dropout`` applies to embeddings, attention
    probabilities and both residual branches; keep it 0 for pretraining.
    """

    vocab_size: int
    seq_len: int
    num_layers: int
    num_heads: int
    d_model: int
    mlp_ratio: int = 4
    positions: Literal["rotary", "learned"] = "rotary"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_layers", "num_heads", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is a typo, not a config.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.positions not in _POSITIONS:
            raise ValueError(
                f"GPTConfig.positions must be one of {_POSITIONS}, got {self.positions!r}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} must be divisible by "
                f"GPTConfig.num_heads={self.num_heads}; change one of them"
            )
        if self.positions == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig.d_model / GPTConfig.num_heads = {self.head_dim} must be even "
                "for rotary positions (dimensions rotate in pairs); change d_model or "
                "num_heads, or use positions='learned'"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @classmethod
    def from_spec(cls, section: Any) -> GPTConfig:
        """The config a run spec's ``[model]`` section describes.

        The one place a spec becomes a model shape: ``section`` is a
        ``crowdtrain.protocol.runspec.ModelSection``, whose fields are this
        class's by name (read here by name, so ``model`` needs nothing of the
        spec's module).
        """
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def estimate_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs (forward + backward) to process one token of a full-length sequence.

    Counts ``6 * M + 12 * num_layers * d_model * seq_len``, the PaLM / nanoGPT
    estimate, where ``M`` is the number of weights in matrix multiplies:

    - per layer, ``4 * d_model**2`` for the attention projections (query, key,
      value, output) and ``2 * mlp_ratio * d_model**2`` for the MLP;
    - ``d_model * vocab_size`` for the lm_head, counted although its weight
      is tied to the token embedding, because the matmul still runs.

    Each weight costs 2 FLOPs (multiply + add) forward and 4 backward, hence 6.
    The second term is attention itself (scores ``QK^T`` and the weighted sum
    of values) over ``seq_len`` keys, also 2 forward + 4 backward per
    multiply-add, without halving for the causal mask (as PaLM counts it).
    Not counted: embedding lookups, norms, rotary, softmax, GELU, the loss and
    the optimizer step, which are all O(d_model) per token and small.
    """
    d = config.d_model
    matmul_weights = config.num_layers * (4 + 2 * config.mlp_ratio) * d * d + d * config.vocab_size
    attention = 12 * config.num_layers * d * config.seq_len
    return float(6 * matmul_weights + attention)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over every position.

    ``logits`` is ``[B, T, V]``, ``targets`` is ``[B, T]`` int64. Computed in
    float32 whatever the logits' dtype, because bf16 log-softmax over a large
    vocabulary loses the small differences that the loss is made of.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, ``[B]`` float32, in nats.

    Same arithmetic as :func:`lm_loss` (float32 log-softmax), averaged per row
    of ``logits`` ``[B, T, V]`` and ``targets`` ``[B, T]`` instead of over all.
    """
    B, T, V = logits.shape
    per_token = F.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1), reduction="none"
    )  # [B * T]
    return per_token.view(B, T).mean(dim=1)


def _rotary_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``[seq_len, head_dim // 2]`` of every position's rotation angles."""
    half = config.head_dim // 2
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, head_dim]`` by its position's angles ``[T, head_dim // 2]``.

    Pairs dimension ``i`` with ``i + head_dim // 2`` (the GPT-NeoX / LLaMA
    layout), so weights export to ``transformers`` without permuting heads.
    """
    x1, x2 = x.chunk(2, dim=-1)  # [B, H, T, head_dim // 2] each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the past only."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        B, T, C = x.shape  # [B, T, d_model]
        q, k, v = self.qkv(x).split(C, dim=2)  # [B, T, d_model] each
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
        if rotary is not None:
            q = _apply_rotary(q, *rotary)
            k = _apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # [B, H, T, hd]
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen by ``mlp_ratio``, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))  # [B, T, d_model]


class Block(nn.Module):
    """One pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary)
        return x + self.mlp(self.mlp_norm(x))


def _norm(config: GPTConfig) -> nn.RMSNorm:
    # RMSNorm rather than LayerNorm: it skips mean-centering and the bias,
    # trains as well in pre-norm decoders (LLaMA, nanochat), costs one
    # reduction instead of two, and maps one-to-one onto transformers' RMSNorm
    # weights for export.
    return nn.RMSNorm(config.d_model, eps=1e-5)


class GPT(nn.Module):
    """A decoder-only transformer language model (nanoGPT's shape, pre-norm, no biases).

    Token embedding, optional learned position embedding, ``num_layers``
    pre-norm blocks, a final RMSNorm and an lm_head whose weight *is* the token
    embedding (tied: one tensor, two names in the state dict). Init is
    deterministic given ``torch.manual_seed``: normal(0, 0.02) everywhere, with
    the two residual projections of each block scaled by ``1/sqrt(2*num_layers)``
    so the residual stream's variance does not grow with depth.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.seq_len, config.d_model) if config.positions == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight

        self.rotary_cos: torch.Tensor | None
        self.rotary_sin: torch.Tensor | None
        if config.positions == "rotary":
            cos, sin = _rotary_tables(config)
            # Non-persistent: derived from the config, so checkpoints stay free of them.
            self.register_buffer("rotary_cos", cos, persistent=False)  # [seq_len, hd // 2]
            self.register_buffer("rotary_sin", sin, persistent=False)
        else:
            self.rotary_cos = self.rotary_sin = None

        self.apply(_init_weights)
        residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, T, vocab_size]`` for token ids ``idx`` ``[B, T]``, and the loss.

        With ``targets`` (int64 ``[B, T]``, the next token at each position)
        the loss is the mean cross-entropy in nats; without, it is ``None``.
        ``T`` may be at most ``config.seq_len``.
        """
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(
                f"input has {T} tokens per sequence but GPTConfig.seq_len is "
                f"{self.config.seq_len}; crop it to the last {self.config.seq_len} tokens"
            )
        x = self.token_embedding(idx)  # [B, T, d_model]
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(T, device=idx.device))  # + [T, d_model]
        x = self.dropout(x)
        rotary = None
        if self.rotary_cos is not None and self.rotary_sin is not None:
            rotary = (self.rotary_cos[:T], self.rotary_sin[:T])  # [T, hd // 2] each
        for block in self.blocks:
            x = block(x, rotary)
        logits = self.lm_head(self.final_norm(x))  # [B, T, vocab_size]
        loss = lm_loss(logits, targets) if targets is not None else None
        return logits, loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters, each tied tensor counted once.

        With ``non_embedding`` the token and position embeddings are left out
        (Kaplan et al.'s N). The token embedding is also the lm_head, so that
        matmul is left out too; ``estimate_flops_per_token`` adds it back.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if self.position_embedding is not None:
                total -= self.position_embedding.weight.numel()
        return total

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Continue each row of ``idx`` ``[B, T]`` by ``max_new_tokens`` sampled tokens.

        Returns ``[B, T + max_new_tokens]``. The model sees at most the last
        ``seq_len`` tokens. ``temperature`` 0 picks the most likely token
        (greedy); ``top_k`` keeps only the k most likely tokens before sampling.
        Runs in eval mode (no dropout) and restores the previous mode after.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.seq_len :])
                logits = logits[:, -1, :]  # [B, vocab_size]
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                idx = torch.cat((idx, next_id), dim=1)
        finally:
            self.train(was_training)
        return idx


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
