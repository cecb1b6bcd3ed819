"""The exported folder is a native transformers model that computes what our GPT computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from crowdtrain.model import GPT, ByteTokenizer
from crowdtrain.model.hf_export import EXPORT_FILES, ExportError, export_hf
from crowdtrain.model.tokenizer import BPETokenizer

transformers = pytest.importorskip("transformers")

TEXT = "def f(x):\n    return 'é ∑ Ā <|endoftext|>' + chr(0)\n"


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A rotary GPT with weights far from init (norm gains too), exported as a byte run."""
    from tests.model.conftest import _tiny_config

    config = _tiny_config(num_heads=4, d_model=64, seq_len=48)
    torch.manual_seed(3)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.eval()
    folder = tmp_path_factory.mktemp("hf")
    export_hf(folder, config, model.state_dict(), "byte", metadata={"run_id": "unit"})
    return model, folder


def test_writes_the_documented_files_without_pickles(trained_like):
    model, folder = trained_like
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ArceeForCausalLM"]
    assert config["intermediate_size"] == 4 * 64 and config["max_position_embeddings"] == 48
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == 0
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.metadata()["run_id"] == "unit" and f.metadata()["format"] == "pt"
        assert "lm_head.weight" not in f.keys()  # tied to model.embed_tokens.weight
        assert len(list(f.keys())) == 2 + 8 * model.config.num_layers
    card = (folder / "README.md").read_text()
    assert "ArceeForCausalLM" in card and "| run_id | `unit` |" in card


def test_transformers_computes_the_same_logits_and_greedy_tokens(trained_like):
    model, folder = trained_like
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code
    hf.eval()
    assert type(hf).__name__ == "ArceeForCausalLM"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.manual_seed(0)
    idx = torch.randint(1, 256, (3, 48))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    prompt = idx[:1, :6]
    expected = model.generate(prompt, 30, temperature=0)
    got = hf.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30)
    assert got.tolist() == expected.tolist()


def test_byte_tokenizer_round_trips_through_auto_tokenizer(trained_like):
    _, folder = trained_like
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == ByteTokenizer().encode(TEXT).tolist()  # literal specials stay bytes
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.decode([100, 0, 101], skip_special_tokens=True) == "de"


def test_bpe_tokenizer_is_shipped_as_is(tmp_path, tiny_config):
    bpe = BPETokenizer.train([TEXT * 20, "import os\nimport sys\n" * 50], vocab_size=300)
    bpe.save(tmp_path / "tokenizer.json")
    config = tiny_config(vocab_size=bpe.vocab_size)
    out = tmp_path / "hf"
    export_hf(out, config, GPT(config).state_dict(), "bpe", tmp_path / "tokenizer.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == bpe.encode(TEXT).tolist()
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == bpe.eod_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == bpe.eod_id


def test_learned_positions_are_refused_with_the_reason(tmp_path, tiny_config):
    config = tiny_config(positions="learned")
    with pytest.raises(ExportError, match="positions='learned'.*no native architecture.*rotary"):
        export_hf(tmp_path / "out", config, GPT(config).state_dict(), "byte")
    assert not (tmp_path / "out").exists()


def test_parameters_of_another_shape_are_refused(tmp_path, tiny_config):
    state = GPT(tiny_config(num_layers=1)).state_dict()
    with pytest.raises(ExportError, match="do not match the run's GPTConfig"):
        export_hf(tmp_path / "out", tiny_config(num_layers=2), state, "byte")
