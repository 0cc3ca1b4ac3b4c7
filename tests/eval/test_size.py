"""Sizes: files on disk, unique tensor bytes, and the real size of an fp32 safetensors checkpoint."""

import pytest
import torch
from torch import nn

from lowbit import LowbitError
from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes, tensor_bytes


def _tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_dir_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(10))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(1234))
    assert dir_bytes(tmp_path / "a.bin") == 10
    assert dir_bytes(tmp_path) == 1244
    assert dir_bytes(str(tmp_path / "sub")) == 1234
    with pytest.raises(LowbitError, match="nope: no such file or folder"):
        dir_bytes(tmp_path / "nope")


def test_tensor_bytes_counts_shared_memory_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    sd = {"emb": emb.weight, "head": head.weight, "other": torch.zeros(3, dtype=torch.int8)}
    assert tensor_bytes(sd) == 10 * 4 * 4 + 3
    base = torch.zeros(8)
    assert tensor_bytes({"a": base[:4], "b": base[4:]}) == 32  # disjoint views of one storage
    assert tensor_bytes({"a": base, "b": base.view(2, 4)}) == 32  # same memory, another shape


def test_tied_model_counts_embedding_once():
    tied, untied = _tiny_llama(True), _tiny_llama(False)
    emb = 100 * 32 * 4
    assert tensor_bytes(untied.state_dict()) - tensor_bytes(tied.state_dict()) == emb


@pytest.mark.parametrize("tie", [True, False])
def test_fp32_checkpoint_bytes_equals_real_file(tmp_path, tie):
    model = _tiny_llama(tie)
    model.save_pretrained(tmp_path)
    assert fp32_checkpoint_bytes(model) == dir_bytes(tmp_path / "model.safetensors")


def test_fp32_checkpoint_bytes_of_bf16_model_is_fp32_size(tmp_path):
    model = _tiny_llama()
    expected = fp32_checkpoint_bytes(model)
    assert fp32_checkpoint_bytes(model.to(torch.bfloat16)) == expected
    assert model.dtype == torch.bfloat16  # not modified


@pytest.mark.slow
def test_smollm2_fp32_checkpoint_bytes(smollm2):
    from lowbit.models import cache_root

    n = fp32_checkpoint_bytes(smollm2[0])
    print(f"\nSmolLM2-135M fp32 checkpoint: {n} bytes")
    cached = cache_root() / "smollm2-135m" / "model.safetensors"
    if cached.is_file():
        assert n == dir_bytes(cached)
    assert 530e6 < n < 545e6  # 134.5 M parameters (embedding tied), 4 bytes each


def test_size_components_split_a_quantized_model_and_sum_to_its_bytes():
    import lowbit
    from lowbit.eval.size import size_components

    model = _tiny_llama()
    empty = dict.fromkeys(["codes", "scales", "zero_points", "tables", "activation_qparams"], 0)
    assert size_components(model) == empty | {"float": tensor_bytes(model.state_dict())}
    lowbit.quantize_(model, lowbit.WeightOnly(bits=4, group_size=16))
    parts = size_components(model)
    assert parts["codes"] > 0 and parts["scales"] > 0 and parts["zero_points"] > 0 and parts["tables"] == 0
    assert sum(parts.values()) == tensor_bytes(model.state_dict())
    # 4-bit codes: half a byte per weight of every QLinear; the embedding shares the tied head's codes
    weights = sum(m.rows * m.cols for m in model.modules() if isinstance(m, lowbit.nn.QLinear))
    assert parts["codes"] == weights // 2
