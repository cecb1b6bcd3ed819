"""Model FLOPs utilisation of one node's training step on a GPU.

Trains crowdtrain's GPT at GPT-2 small's shape (124M parameters: vocab
50304, 12 layers, 12 heads, d_model 768, seq_len 1024, rotary positions) on
random tokens with AdamW and bf16 autocast, the micro-batch chosen by
``node.hardware.choose_micro_batch`` and gradients accumulated to the
per-step batch. After warm-up steps it times whole optimizer steps between
``torch.cuda.synchronize`` calls. FLOPs per token are
``model.estimate_flops_per_token`` (6 FLOPs per matmul weight, i.e. training
= 3x forward, plus attention's ``12 * layers * d_model * seq_len``); the peak
is the GPU's dense bf16 rate from ``protocol.devices``.

    python bench/mfu.py --device cuda --both --out bench/results/mfu.md

Without a GPU (``--device cpu``, or ``auto`` on a machine without one) it
runs a tiny smoke version in seconds and says so. Imports neither hivemind
nor the network stack, so it runs wherever torch does.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crowdtrain.model import GPT, GPTConfig, estimate_flops_per_token, param_groups  # noqa: E402
from crowdtrain.node.device.micro_batch import (  # noqa: E402
    MicroBatchChoice,
    choose_micro_batch,
    estimate_sequence_bytes,
    format_bytes,
)
from crowdtrain.node.device.precision import (  # noqa: E402
    autocast,
    maybe_compile,
    prefer_expandable_segments,
)
from crowdtrain.protocol.devices import device_peak  # noqa: E402

GPT2_SMALL = GPTConfig(
    vocab_size=50304, seq_len=1024, num_layers=12, num_heads=12, d_model=768, positions="rotary"
)
SMOKE = GPTConfig(vocab_size=256, seq_len=64, num_layers=2, num_heads=2, d_model=64)


@dataclass(frozen=True)
class Timing:
    mode: str
    micro_batch: int
    accumulation: int
    step_s: float
    tokens_per_s: float
    flops_per_s: float
    peak_memory_bytes: int | None
    compile_s: float


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}"


def _train_steps(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    micro_batch: int,
    accumulation: int,
    num_steps: int,
) -> None:
    config = model.config
    for _ in range(num_steps):
        for _ in range(accumulation):
            tokens = torch.randint(
                0, config.vocab_size, (micro_batch, config.seq_len + 1), device=device
            )
            with autocast(device):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            assert loss is not None
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    config: GPTConfig,
    device: torch.device,
    choice: MicroBatchChoice,
    batch: int,
    *,
    compile_model: bool,
    warmup: int,
    steps: int,
) -> Timing:
    """Time ``steps`` optimizer steps of ``batch`` sequences (rounded to whole micro-batches)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.train()
    micro = choice.size
    accumulation = max(1, round(batch / micro))
    started = time.perf_counter()
    maybe_compile(model, compile_model, example_batch=(micro, config.seq_len, config.vocab_size))
    _sync(device)
    compile_s = time.perf_counter() - started if compile_model else 0.0
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    _train_steps(model, optimizer, device, micro, accumulation, warmup)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    _train_steps(model, optimizer, device, micro, accumulation, steps)
    _sync(device)
    elapsed = time.perf_counter() - started
    tokens = steps * accumulation * micro * config.seq_len
    tokens_per_s = tokens / elapsed
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Timing(
        "torch.compile" if compile_model else "eager",
        micro,
        accumulation,
        elapsed / steps,
        tokens_per_s,
        tokens_per_s * estimate_flops_per_token(config),
        peak,
        compile_s,
    )


def _memory_section(config: GPTConfig, device: torch.device, choice: MicroBatchChoice) -> str:
    """The CUDA probe's figures beside the device-independent estimate the CPU path uses."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    with autocast(device):
        probe = model(torch.zeros(1, 8, dtype=torch.long, device=device))[0]
    per_sequence, fixed = estimate_sequence_bytes(
        model, device, seq_len=config.seq_len, vocab_size=config.vocab_size
    )
    del model
    lines = [
        f"- Micro-batch: **{choice.size}** sequences; {choice.reason}.",
        f"- `autocast({device.type!r})`: logits come out as `{probe.dtype}`.",
    ]
    if choice.bytes_per_sequence is not None:
        lines.append(
            f"- Measured peak per sequence (forward+backward, "
            f"`torch.cuda.max_memory_allocated`): {format_bytes(choice.bytes_per_sequence)}; "
            f"estimate from autograd's saved tensors (what a capped CPU/MPS node uses): "
            f"{format_bytes(per_sequence)} per sequence, {format_bytes(fixed)} fixed."
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--compile", action="store_true", help="time torch.compile only")
    parser.add_argument("--both", action="store_true", help="time eager, then torch.compile")
    parser.add_argument("--batch", type=int, default=256, help="sequences per optimizer step (GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    prefer_expandable_segments()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/mfu.py: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    gpu = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    config = GPT2_SMALL if gpu else SMOKE
    batch, warmup, steps = (args.batch, args.warmup, args.steps) if gpu else (8, 1, 3)
    modes = [False, True] if args.both else [args.compile]
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    probe_model = GPT(config).to(device)
    num_params = probe_model.num_parameters()
    started = time.perf_counter()
    choice = choose_micro_batch(
        probe_model,
        device,
        seq_len=config.seq_len,
        vocab_size=config.vocab_size,
        upper=batch,
        default=4,
    )
    choose_s = time.perf_counter() - started
    del probe_model
    if gpu:
        torch.cuda.empty_cache()
    memory = _memory_section(config, device, choice)

    timings = []
    notes = []
    for compile_model in modes:
        micro = choice
        while True:
            try:
                timings.append(
                    measure(
                        config,
                        device,
                        micro,
                        batch,
                        compile_model=compile_model,
                        warmup=warmup,
                        steps=steps,
                    )
                )
                break
            except torch.cuda.OutOfMemoryError:
                if micro.size == 1:
                    raise
                torch.cuda.empty_cache()
                notes.append(
                    f"- {'torch.compile' if compile_model else 'eager'}: the chosen "
                    f"micro-batch of {micro.size} ran out of memory in training; halved."
                )
                micro = MicroBatchChoice(micro.size // 2, "halved after running out of memory")
    device_name = _device_name(device)
    peak = device_peak(device_name)
    flops_per_token = estimate_flops_per_token(config)
    peak_flops = peak.bf16_flops if gpu else peak.fp32_flops

    out = [
        "# Model FLOPs utilisation",
        "",
    ]
    if not gpu:
        out += [
            "**No GPU here**: a tiny smoke run on CPU (2 layers, d_model 64) in fp32; its MFU "
            "against the CPU's nominal fp32 peak means little. Run "
            "`python bench/mfu.py --device cuda --both` on a GPU for the real figure.",
            "",
        ]
    out += [
        f"Device `{device_name}` (peak {peak_flops / 1e12:.3g} TFLOP/s dense "
        f"{'bf16' if gpu else 'fp32'}, `protocol/devices.py` row {peak.name!r}), "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        f"Model: crowdtrain GPT, {num_params / 1e6:.1f}M parameters, vocab {config.vocab_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads, d_model {config.d_model}, "
        f"seq_len {config.seq_len}, {config.positions} positions. Random tokens, AdamW "
        f"({'fused, ' if gpu else ''}weight decay on matrices), grad clip 1.0, "
        f"{'bf16 autocast, TF32 matmuls' if gpu else 'fp32'}. "
        f"FLOPs per token {flops_per_token / 1e9:.3f} G "
        "(`estimate_flops_per_token`: 6 per matmul weight incl. the tied lm_head, i.e. "
        "training = 3x forward, plus attention 12·layers·d_model·seq_len, causal mask "
        "not halved). "
        f"Timed {steps} optimizer steps after {warmup} warm-up steps.",
        "",
        f"Command: `python bench/mfu.py {' '.join(sys.argv[1:])}`.",
        "",
        memory,
        f"- Choosing the micro-batch took {choose_s:.1f} s.",
        *notes,
        "",
        "| mode | micro-batch | accumulation | sequences / step | step time | tokens/s "
        "| achieved TFLOP/s | MFU | peak memory | compile time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in timings:
        mfu = t.flops_per_s / peak_flops
        memory_cell = format_bytes(t.peak_memory_bytes) if t.peak_memory_bytes else "n/a"
        compile_cell = f"{t.compile_s:.0f} s" if t.mode != "eager" else "-"
        out.append(
            f"| {t.mode} | {t.micro_batch} | {t.accumulation} | {t.micro_batch * t.accumulation} "
            f"| {t.step_s:.3f} s | {t.tokens_per_s:,.0f} | {t.flops_per_s / 1e12:.3g} "
            f"| {mfu:.1%} | {memory_cell} | {compile_cell} |"
        )
    text = "\n".join(out) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if all(math.isfinite(t.tokens_per_s) for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
