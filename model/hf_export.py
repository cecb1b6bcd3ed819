"""Export a GPT to a folder that Hugging Face ``transformers`` loads without remote code.

A rotary GPT is exactly transformers' native Arcee architecture (LLaMA-style
pre-norm decoder: RMSNorm with eps 1e-5, rotary embeddings in the rotate-half
layout, no biases, a non-gated MLP ``down(act(up(x)))`` with ``hidden_act``
``"gelu"`` (erf GELU, as ``F.gelu``), tied embeddings), so the export only
renames tensors and splits the fused query/key/value projection. Owns the
config, weight names and tokenizer files of that folder; writes JSON and
safetensors itself and never imports ``transformers``. Knows nothing about
runs, stores or where checkpoints come from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from crowdtrain.model.gpt import ROTARY_BASE, GPTConfig
from crowdtrain.model.tokenizer import EOD_BYTE, EOD_TOKEN
from crowdtrain.protocol.errors import CrowdtrainError

HF_MODEL_TYPE = "arcee"
HF_ARCHITECTURE = "ArceeForCausalLM"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CARD_FILE = "README.md"
EXPORT_FILES = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    MODEL_CARD_FILE,
)
"""Every file :func:`export_hf` writes, in the order it writes them."""

RMS_NORM_EPS = 1e-5  # model/gpt.py's _norm

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]
"""``progress(items, total, description)`` yields ``items`` back, e.g. through a tqdm bar."""


class ExportError(CrowdtrainError):
    """A model or tokenizer that cannot be exported, or a folder that cannot be written."""


def check_exportable(config: GPTConfig) -> None:
    """Raise :class:`ExportError` unless ``config`` maps onto a native transformers model."""
    if config.positions != "rotary":
        raise ExportError(
            f"cannot export a model with positions={config.positions!r}: transformers has no "
            "native architecture for a pre-norm RMSNorm decoder with a learned position table "
            "(GPT-2's uses LayerNorm with biases), and the export must load without remote "
            'code; train the run with [model] positions = "rotary" to export it'
        )


def hf_config(config: GPTConfig, eod_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of the exported model; ``eod_id`` is the end-of-document token.

    The end-of-document token is the model's eos (generation stops there) and
    its bos and pad too: in training data it is what precedes a document.
    """
    check_exportable(config)
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_ratio * config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.head_dim,
        "hidden_act": "gelu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "use_cache": True,
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_generation_config(eod_id: int) -> dict[str, Any]:
    """The ``generation_config.json``: stop at the end-of-document token, pad with it."""
    return {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id}


def hf_tensors(
    state_dict: dict[str, torch.Tensor], config: GPTConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict's tensors under transformers' Arcee names, one by one.

    The fused ``qkv`` weight ``[3 * d_model, d_model]`` splits into ``q_proj``,
    ``k_proj`` and ``v_proj`` (its rows, in that order); ``lm_head.weight`` is
    left out because it is the token embedding (``tie_word_embeddings``).
    Raises :class:`ExportError` when the keys are not those of ``GPT(config)``.
    """
    check_exportable(config)
    expected = _expected_keys(config)
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise ExportError(
            f"the parameters do not match the run's GPTConfig (missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}); is this checkpoint from another run?"
        )
    d = config.d_model
    yield "model.embed_tokens.weight", state_dict["token_embedding.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        qkv = state_dict[ours + "attn.qkv.weight"]  # [3 * d_model, d_model]
        yield theirs + "input_layernorm.weight", state_dict[ours + "attn_norm.weight"]
        yield theirs + "self_attn.q_proj.weight", qkv[:d]
        yield theirs + "self_attn.k_proj.weight", qkv[d : 2 * d]
        yield theirs + "self_attn.v_proj.weight", qkv[2 * d :]
        yield theirs + "self_attn.o_proj.weight", state_dict[ours + "attn.proj.weight"]
        yield theirs + "post_attention_layernorm.weight", state_dict[ours + "mlp_norm.weight"]
        yield theirs + "mlp.up_proj.weight", state_dict[ours + "mlp.up.weight"]
        yield theirs + "mlp.down_proj.weight", state_dict[ours + "mlp.down.weight"]
    yield "model.norm.weight", state_dict["final_norm.weight"]


def num_hf_tensors(config: GPTConfig) -> int:
    """How many tensors :func:`hf_tensors` yields."""
    return 2 + 8 * config.num_layers


def _expected_keys(config: GPTConfig) -> set[str]:
    keys = {"token_embedding.weight", "final_norm.weight", "lm_head.weight"}
    for i in range(config.num_layers):
        for name in ("attn_norm", "mlp_norm"):
            keys.add(f"blocks.{i}.{name}.weight")
        for name in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"):
            keys.add(f"blocks.{i}.{name}.weight")
    return keys


def byte_tokenizer_json() -> str:
    """A ``tokenizer.json`` whose ids are the UTF-8 bytes, as :class:`ByteTokenizer`'s.

    A byte-level BPE without merges: the byte-level pre-tokenizer spells each
    byte as one character of its alphabet and the vocabulary maps that
    character to the byte's value. The end-of-document byte is also declared a
    special token (so ``skip_special_tokens`` drops it); ``tokenizer_config.json``
    sets ``split_special_tokens`` so text is always encoded byte by byte.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(alphabet[EOD_BYTE], special=True, normalized=False)])
    return tokenizer.to_str(pretty=True)


def byte_eod_token() -> str:
    """The end-of-document token's text in :func:`byte_tokenizer_json`."""
    return _byte_alphabet()[EOD_BYTE]


def _byte_alphabet() -> dict[int, str]:
    # GPT-2's byte-to-character table, which the ByteLevel pre-tokenizer and decoder use:
    # printable bytes stand for themselves, the rest take characters from U+0100 upward.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_config(eod_token: str, seq_len: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that makes ``AutoTokenizer`` load ``tokenizer.json`` as is.

    ``split_special_tokens``: a literal ``<|endoftext|>`` in text is encoded as
    text, as crowdtrain's own tokenizers do; the token itself only comes from
    the data (between documents) or the model.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_token,
        "eos_token": eod_token,
        "pad_token": eod_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
    }


def export_hf(
    folder: str | os.PathLike[str],
    config: GPTConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: str,
    tokenizer_file: str | os.PathLike[str] | None = None,
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write the model as a transformers folder into ``folder`` (created if missing).

    ``tokenizer`` is ``"byte"`` (no file needed) or ``"bpe"`` with the run's
    ``tokenizer_file`` (its ``tokenizer.json``, copied as is). ``metadata``
    strings go into the safetensors header (run id, step...) and the model
    card (``README.md``). ``progress``
    wraps the tensor loop, for a progress bar. Returns the files written.
    Does not make the write atomic: write into a fresh folder and rename it.
    """
    check_exportable(config)
    folder = Path(folder)
    if tokenizer == "byte":
        tokenizer_json, eod_token, eod_id = byte_tokenizer_json(), byte_eod_token(), EOD_BYTE
    elif tokenizer == "bpe":
        if tokenizer_file is None:
            raise ExportError("a bpe run's export needs its tokenizer.json file")
        tokenizer_json, eod_id = _read_bpe(Path(tokenizer_file))
        eod_token = EOD_TOKEN
    else:
        raise ExportError(f"unknown tokenizer {tokenizer!r}; use 'byte' or 'bpe'")
    if eod_id >= config.vocab_size:
        raise ExportError(
            f"the tokenizer's {eod_token!r} is id {eod_id}, outside the model's vocab_size "
            f"{config.vocab_size}; the tokenizer is not the run's"
        )

    tensors_iter: Iterable[tuple[str, torch.Tensor]] = hf_tensors(state_dict, config)
    if progress is not None:
        tensors_iter = progress(tensors_iter, num_hf_tensors(config), "tensors")
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors_iter
    }
    dtype = tensors["model.embed_tokens.weight"].dtype
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _write_json(folder / CONFIG_FILE, hf_config(config, eod_id, dtype)),
        _write_json(folder / GENERATION_CONFIG_FILE, hf_generation_config(eod_id)),
    ]
    weights = folder / WEIGHTS_FILE
    # transformers reads the "format" key; the rest says where the weights came from.
    save_file(tensors, weights, metadata={**(metadata or {}), "format": "pt"})
    written.append(weights)
    (folder / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    written.append(folder / TOKENIZER_FILE)
    written.append(
        _write_json(folder / TOKENIZER_CONFIG_FILE, tokenizer_config(eod_token, config.seq_len))
    )
    card = folder / MODEL_CARD_FILE
    card.write_text(model_card(config, tokenizer, metadata or {}), encoding="utf-8")
    written.append(card)
    return written


def model_card(config: GPTConfig, tokenizer: str, metadata: dict[str, str]) -> str:
    """The exported folder's ``README.md``: what the model is, where it came from, how to load it."""
    origin = "".join(f"| {key} | `{value}` |\n" for key, value in sorted(metadata.items()))
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n"
        "# A crowdtrain model\n\n"
        "A decoder-only GPT pretrained by volunteers with crowdtrain, exported as "
        f"transformers' native `{HF_ARCHITECTURE}` (no remote code): {config.num_layers} "
        f"layers, {config.num_heads} heads, width {config.d_model}, context {config.seq_len} "
        f"tokens, {tokenizer} tokenizer of {config.vocab_size} ids.\n\n"
        + ("| checkpoint | value |\n| --- | --- |\n" + origin + "\n" if origin else "")
        + "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n'
        'inputs = tokenizer("def ", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100, do_sample=True)[0]))\n"
        "```\n"
    )


def _read_bpe(path: Path) -> tuple[str, int]:
    try:
        text = path.read_text(encoding="utf-8")
        parsed = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"cannot read the run's tokenizer {path}: {e}") from e
    for added in parsed.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == EOD_TOKEN:
            return text, int(added["id"])
    raise ExportError(f"the tokenizer {path} has no {EOD_TOKEN} token; it is not a crowdtrain BPE")


def _write_json(path: Path, value: dict[str, Any]) -> Path:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
