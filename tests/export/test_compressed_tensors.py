"""compressed-tensors export (lowbit.export.compressed_tensors): packing equal to compressed-tensors' own,
configs it validates, folders transformers loads to lowbit's values, SmolLM2 perplexity, bad input."""

import copy
import json

import pytest
import torch

import lowbit
from lowbit.core.errors import LowbitError
from lowbit.export.compressed_tensors import export_compressed_tensors, pack_int32
from support import run_cli, tiny_llama

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402


@pytest.mark.parametrize(
    "bits,n", [(4, 96), (4, 20), (8, 96), (8, 6)], ids=["4b", "4b-ragged", "8b", "8b-ragged"]
)
def test_packing_equals_compressed_tensors(bits, n):
    torch.manual_seed(0)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, n), dtype=torch.int8)
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits))
    assert torch.equal(pack_int32(q.T.contiguous(), bits).T, pack_to_int32(q, bits, packed_dim=0))


def _exported(tmp_path, scheme, name="ct"):
    m = tiny_llama(hidden=64, intermediate=128)
    lowbit.quantize_(m, lowbit.parse_scheme(scheme))
    lowbit.save(m, tmp_path / "q")
    stats = export_compressed_tensors(lowbit.load(tmp_path / "q"), tmp_path / name)
    return m, stats, json.loads((tmp_path / name / "config.json").read_text())


def _hf(path, dequantize=False):
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


# asymmetric pack-quantized folders load with dequantize=True: transformers' plain route builds unpacked
# zero points on the meta device and refuses the packed ones every compressed-tensors writer stores
# (llm-compressor's own asymmetric outputs included)
# Relative logit tolerance: weight-only differs by float summation order only; W8A8's per-token activation
# codes are computed by two implementations whose x/scale can land an ulp apart at a rounding boundary,
# moving one code by one step (measured: 7 of 8 tokens exact, the others 4e-3 relative).
@pytest.mark.parametrize(
    "scheme,fmt,dequantize,tol",
    [("w4g32-sym", "pack-quantized", False, 1e-4), ("w4g32", "pack-quantized", True, 1e-4),
     ("w8-sym", "pack-quantized", False, 1e-4), ("w4-sym", "pack-quantized", False, 1e-4),
     ("w8a8", "int-quantized", False, 2e-2)],
)  # fmt: skip
def test_transformers_loads_lowbits_values(tmp_path, scheme, fmt, dequantize, tol):
    m, stats, cfg = _exported(tmp_path, scheme)
    qc = cfg["quantization_config"]
    assert stats["format"] == qc["format"] == fmt and qc["quant_method"] == "compressed-tensors"
    QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema accepts it
    hf = _hf(tmp_path / "ct", dequantize)
    ids = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60]])
    with torch.no_grad():
        a, b = hf(ids).logits, m(ids).logits  # the first forward decompresses the packed weights
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        want = m.get_submodule(name).dequantized_weight()
        assert torch.equal(hf.get_submodule(name).weight.detach(), want), name  # bit-exact values
    assert float((a - b).abs().max()) < tol * float(b.abs().max())  # weight-only: measured <= 2e-6


def test_tied_float_head_is_stored_once_and_quantized_head_untied(tmp_path):
    m = tiny_llama(hidden=64, intermediate=128)
    lowbit.quantize_(m, lowbit.parse_scheme("w4g32-sym"), exclude=["lm_head", "model.embed_tokens"])
    export_compressed_tensors(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["quantization_config"]["ignore"] == ["lm_head"]
    _, stats, cfg = _exported(tmp_path, "w4g32-sym", "b")
    assert not cfg["tie_word_embeddings"] and stats["float_embeddings"] == ["model.embed_tokens"]


def test_mixed_schemes_form_one_group_each(tmp_path):
    m = tiny_llama(hidden=64, intermediate=128)
    lowbit.quantize_(m, lowbit.parse_scheme("w8-sym"), include=["*mlp*"])
    lowbit.quantize_(m, lowbit.parse_scheme("w4g32-sym"), include=["*self_attn*"])
    lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert sorted(groups) == [4, 8] and all("mlp" in t for t in groups[8])
    hf = _hf(tmp_path / "ct")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert float((hf(ids).logits - m(ids).logits).abs().max()) < 1e-4


@pytest.mark.parametrize(
    "scheme,message",
    [("w4g48", "not a multiple of group 48; quantize with group 32"),
     ("nf4g32", "compressed-tensors holds int4"), ("w3g32", "compressed-tensors holds int4/int8")],
    ids=["ragged-group", "codebook", "3-bit"],
)  # fmt: skip
def test_layouts_it_cannot_hold_are_refused(tmp_path, scheme, message):
    m = tiny_llama(hidden=96, intermediate=128)
    lowbit.quantize_(m, lowbit.parse_scheme(scheme))
    with pytest.raises(LowbitError, match=message):
        export_compressed_tensors(m, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_refuses_a_static_cnn_and_a_float_model(capsys, tmp_path):
    m = tiny_llama()
    lowbit.save(m, tmp_path / "float")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "float"), "--format", "compressed-tensors",
                           "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "no quantized Linear" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "export", "mnist-cnn", "--format", "compressed-tensors", "--out",
                           str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "Hugging Face" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    m = tiny_llama()
    lowbit.quantize_(m, lowbit.parse_scheme("w4g32-sym"))
    with pytest.raises(LowbitError, match="exists"):
        lowbit.save(m, tmp_path / "o", format="compressed-tensors", overwrite=True)  # not a model folder
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_smollm2_perplexity_in_transformers_equals_lowbits(smollm2, tmp_path, capsys):
    from lowbit.data import eval_tokens
    from lowbit.eval.perplexity import perplexity

    model, tok = smollm2
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.parse_scheme("w4g64-sym"))
    lowbit.save(q, tmp_path / "q", tokenizer=tok)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out",
                           str(tmp_path / "ct"))  # fmt: skip
    assert code == 0, err
    hf = _hf(tmp_path / "ct")
    tokens = eval_tokens(tok, 2048)
    ours, theirs = perplexity(q, tokens, window=512), perplexity(hf, tokens, window=512)
    assert abs(theirs / ours - 1) < 1e-3, (ours, theirs)  # the 0.1%; measured 1e-6


def test_static_w8a8_loads_and_a_bias_the_architecture_lacks_is_refused(tmp_path):
    calib = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    m = tiny_llama(hidden=64, intermediate=128)
    lowbit.quantize_(m, lowbit.StaticW8A8(bias_correction=False), calib=calib)
    export_compressed_tensors(m, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert qc["format"] == "int-quantized" and acts["strategy"] == "tensor" and not acts["dynamic"]
    ids = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60]])
    with torch.no_grad():
        a, b = _hf(tmp_path / "ct")(ids).logits, m(ids).logits
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())  # measured 2e-7
    m = tiny_llama(hidden=64, intermediate=128)
    lowbit.quantize_(m, lowbit.StaticW8A8(), calib=calib)  # bias correction gives bias-free Linears a bias
    with pytest.raises(LowbitError, match="bias its architecture does not have"):
        export_compressed_tensors(m, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
