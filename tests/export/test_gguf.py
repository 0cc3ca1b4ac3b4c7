"""GGUF export (lowbit.export.gguf): blocks that gguf-py dequantizes to lowbit's own values, llama.cpp's
q/k row order, the file read back by gguf-py and evaluated by transformers' GGUF loader, bad input."""

import copy

import numpy as np
import pytest
import torch

import lowbit
from lowbit.export.gguf import block_type, gguf_name, pack, rotary_rows
from support import run_cli, tiny_llama

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


def _layer(scheme, rows=6, cols=96):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(cols, rows))
    lowbit.quantize_(m, lowbit.parse_scheme(scheme))
    return m[0]


@pytest.mark.parametrize("scheme,kind,tol", [("w8g32-sym", "Q8_0", 0.0), ("w4g32-sym", "Q4_0", 0.0),
                                             ("w4g32", "Q4_1", 2e-3)])  # fmt: skip
def test_blocks_dequantize_to_lowbits_values(scheme, kind, tol):
    q = _layer(scheme)
    assert block_type(q) == kind
    data = pack(q, kind)
    got = dequantize(data, getattr(gguf.GGMLQuantizationType, kind))
    want = q.dequantized_weight().numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= tol * np.abs(want).max()


def test_rotary_rows_is_llama_cpps_permutation():
    w = np.arange(24 * 3).reshape(24, 3)
    heads = 2
    want = w.reshape(heads, 2, 24 // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert (w[rotary_rows(24, heads)] == want).all()


def test_names_and_unsupported_layouts():
    assert gguf_name("model.layers.3.self_attn.k_proj") == "blk.3.attn_k"
    assert gguf_name("model.layers.0.post_attention_layernorm") == "blk.0.ffn_norm"
    assert gguf_name("model.embed_tokens") == "token_embd" and gguf_name("model.rotary_emb") is None
    with pytest.raises(lowbit.LowbitError, match="group 128"):
        block_type(_layer("w4g128", cols=256))


def test_cli_refuses_a_model_not_read_from_gguf(capsys, tmp_path):
    m = tiny_llama()
    lowbit.quantize_(m, lowbit.parse_scheme("w4g32-sym"))
    lowbit.save(m, tmp_path / "q")
    code, _, err = run_cli(
        capsys, "export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")
    )
    assert code == 2 and "GGUF file the float model was read from" in err and err.count("\n") == 1
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_smollm2_q4_0_reads_back_and_runs_in_transformers(smollm2, tmp_path, capsys):
    model, tok = smollm2
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.parse_scheme("w4g32-sym"))
    lowbit.save(q, tmp_path / "q", tokenizer=tok)
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(capsys, "export", str(tmp_path / "q"), "--format", "gguf", "--out", str(out))
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    down = q.model.layers[5].mlp.down_proj
    assert np.array_equal(np.asarray(tensors["blk.5.ffn_down.weight"].data), pack(down, "Q4_0"))
    assert tensors["blk.5.ffn_down.weight"].tensor_type.name == "Q4_0"
    back, tok2 = lowbit.models.load(str(out), cache_dir=tmp_path / "cache", progress=False)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]])
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]
    with torch.no_grad():
        a, b = q(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) < 1e-3  # the same values: measured 6e-5 on 256 tokens
    code, _, err = run_cli(capsys, "export", str(tmp_path / "q"), "--format", "gguf", "--out", str(out))
    assert code == 2 and "already exists" in err
