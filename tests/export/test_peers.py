"""Folders quantized by other tools (GPTQ, AWQ) load into lowbit's layers with the producer's numbers.

The fixtures are written by a packer of this file's own, following the published layouts (AutoGPTQ's
``QuantLinear.pack``, GPTQModel's v2 -> v1 zero-point conversion, AutoAWQ's ``WQLinear_GEMM.from_linear``),
from random codes ``q``, zero points ``z`` and float16 scales ``s``; the reference is a float model whose
Linear weights are ``(q - z) * s``, the producers' dequantization.
"""

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.core.errors import CheckpointError
from lowbit.export.peers import IMPORTERS, is_peer
from lowbit.nn.modules import QLinear
from lowbit.workflows import load_any
from support import run_cli, tiny_llama

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
HIDDEN, INTERMEDIATE = 64, 128


def _int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 (two's complement), as the producers store them."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_fields(vals: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Pack ``vals (rows, n)`` along the last dim: value ``k*per + order[i]`` into bits ``bits*i`` of word
    ``k`` (int64 words, not yet wrapped)."""
    per = 32 // bits
    order = order or range(per)
    words = torch.zeros(vals.shape[0], vals.shape[1] // per, dtype=torch.int64)
    for k in range(words.shape[1]):
        for i, col in enumerate(order):
            words[:, k] |= vals[:, k * per + col].long() << (bits * i)
    return words


def _gptq_tensors(q, z, s, bits, v1):
    """GPTQ ``qweight (in*b/32, out)``, ``qzeros (groups, out*b/32)``, ``scales``: q ``(in, out)``,
    z/s ``(groups, out)``. v1: every zero-point word minus one per field (GPTQModel's v2 -> v1)."""
    qweight = _int32(_pack_fields(q.t(), bits).t())
    zeros = _pack_fields(z, bits)
    if v1:
        zeros = zeros - sum(1 << (bits * i) for i in range(32 // bits))
    return {"qweight": qweight.contiguous(), "qzeros": _int32(zeros), "scales": s}


def _awq_tensors(q, z, s, bits, v1):
    """AWQ GEMM ``qweight (in, out/8)`` and ``qzeros (groups, out/8)`` in the order 0 2 4 6 1 3 5 7."""
    return {"qweight": _int32(_pack_fields(q, 4, AWQ_ORDER)), "qzeros": _int32(_pack_fields(z, 4, AWQ_ORDER)),
            "scales": s}  # fmt: skip


def _codes(n_in, n_out, bits, group, sym, gen):
    """Random ``q (in, out)``, ``z (groups, out)``, float16 ``s (groups, out)`` and the float weight
    ``(out, in)`` they stand for, computed in float32 (exact: q - z is a small integer)."""
    size = n_in if group == -1 else group
    groups = math.ceil(n_in / size)
    q = torch.randint(0, 2**bits, (n_in, n_out), generator=gen)
    if sym:
        z = torch.full((groups, n_out), 2 ** (bits - 1))
    else:  # z = 0 once: GPTQ v1's word then borrows from its next field (GPTQModel's conversion)
        z = torch.randint(1, 2**bits, (groups, n_out), generator=gen)
        z[0, 0] = 0
    s = (torch.rand(groups, n_out, generator=gen) * 0.05 + 0.01).half()
    g = torch.arange(n_in) // size
    w = (q - z[g]).float() * s.float()[g]
    return q, z, s, w.t().contiguous()


def _quant_config(method, bits, group, sym, fmt, lm_head):
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": False,
                "checkpoint_format": fmt, "true_sequential": True, "lm_head": lm_head}  # fmt: skip
    return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}


def write_peer(folder, method="gptq", bits=4, group=32, sym=True, fmt="gptq", qcfg=None, edit=None, **model):
    """Write a peer folder of a tiny random Llama (hidden 64, 2 layers); returns the reference float model.
    ``qcfg``: entries added to (None: removed from) the quantization config; ``edit(tensors)``: change the
    tensors before they are written; ``model``: ``vocab``, ``bias`` (Linear biases), ``lm_head`` (quantized
    too)."""
    gen = torch.Generator().manual_seed(0)
    bias, lm_head = model.pop("bias", False), model.pop("lm_head", False)
    float_model = tiny_llama(model.pop("vocab", 64), HIDDEN, INTERMEDIATE, attention_bias=bias, mlp_bias=bias)
    for name, p in float_model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.data = (name.endswith("weight")) + 0.1 * torch.randn(p.shape, generator=gen)
    ref = copy.deepcopy(float_model)
    targets = [n for n, m in float_model.named_modules() if n.rsplit(".", 1)[-1] in LINEARS]
    tensors = {}
    for name in targets + ["lm_head"] * lm_head:
        m = float_model.get_submodule(name)
        q, z, s, w = _codes(m.in_features, m.out_features, bits, group, sym, gen)
        packed = (_gptq_tensors if method == "gptq" else _awq_tensors)(q, z, s, bits, fmt == "gptq")
        if method == "gptq":
            packed["g_idx"] = (torch.arange(m.in_features) // (m.in_features if group == -1 else group)).int()
        tensors |= {f"{name}.{k}": v for k, v in packed.items()}
        ref.get_submodule(name).weight = nn.Parameter(w)  # a new Parameter: unties a quantized LM head
    for name, p in float_model.named_parameters():
        if name.removesuffix(".weight") not in targets + ["lm_head"]:
            tensors[name] = p.detach().half()
            ref.get_parameter(name).data = p.detach().half().float()
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    quant = _quant_config(method, bits, group, sym, fmt, lm_head)
    quant = {k: v for k, v in (quant | (qcfg or {})).items() if v is not None}
    config = float_model.config.to_dict() | {"quantization_config": quant, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config))
    return ref.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# transformers 5's AwqConfig also writes GPTQ-style fields (its sym is not AWQ's zero_point), a kernel backend
AWQ_TRANSFORMERS_5 = {
    "sym": True,
    "desc_act": False,
    "act_group_aware": True,
    "format": "gemm",
    "backend": "auto",
}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "kwargs,fmt_label",
    [
        ({"method": "gptq", "sym": True}, "int4 g32 sym"),
        ({"method": "gptq", "sym": False}, "uint4 g32 asym"),
        ({"method": "gptq", "sym": False, "fmt": "gptq_v2"}, "uint4 g32 asym"),
        ({"method": "gptq", "sym": True, "bits": 8, "group": -1}, "int8 per_channel sym"),
        ({"method": "gptq", "sym": False, "bits": 2, "group": 64}, "uint2 g64 asym"),
        ({"method": "awq", "sym": False}, "uint4 g32 asym"),
        ({"method": "awq", "sym": False, "qcfg": AWQ_TRANSFORMERS_5}, "uint4 g32 asym"),
    ],
    ids=["gptq-sym", "gptq-asym-v1", "gptq-asym-v2", "gptq-w8-per-channel", "gptq-w2", "awq", "awq-hf5"],
)
def test_logits_match_the_producers_dequantization(tmp_path, kwargs, fmt_label):
    ref = write_peer(tmp_path / "peer", **kwargs)
    assert is_peer(tmp_path / "peer")
    model = lowbit.load(tmp_path / "peer")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(layers) == 14 and {m.format_label() for m in layers.values()} == {fmt_label}
    for name, m in layers.items():  # exact: lowbit's dequantization is the producer's (q - z) * s
        assert m.scale.dtype == torch.float16
        assert torch.equal(m.dequantized_weight(), ref.get_submodule(name).weight), name
    want, got = _logits(ref, IDS), _logits(model, IDS)
    assert (
        got - want
    ).abs().max() <= 1e-4 * want.abs().max()  # measured <= 7e-7 relative (cpu_native, sum order)
    assert model.lowbit_config["quant_method"] == kwargs["method"]
    assert not hasattr(model.config, "quantization_config")


def test_biases_and_a_quantized_lm_head(tmp_path):
    """GPTQModel's ``lm_head=True`` on a model with tied embeddings: the head is quantized, the embedding
    stays float; Linear biases (Qwen2-style attention biases) load as float32."""
    ref = write_peer(tmp_path / "peer", "gptq", sym=False, bias=True, lm_head=True)
    model = lowbit.load(tmp_path / "peer")
    assert isinstance(model.lm_head, QLinear) and isinstance(model.model.embed_tokens, nn.Embedding)
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.bias, ref.model.layers[0].self_attn.q_proj.bias)
    want, got = _logits(ref, IDS), _logits(model, IDS)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_saves_as_a_lowbit_checkpoint(tmp_path):
    write_peer(tmp_path / "peer", "awq", sym=False)
    model = lowbit.load(tmp_path / "peer")
    lowbit.save(model, tmp_path / "saved")
    again = lowbit.load(tmp_path / "saved")
    assert torch.equal(_logits(model, IDS), _logits(again, IDS))
    assert again.lowbit_config["quant_method"] == "awq"


def test_autogptq_quantize_config_and_shards(tmp_path):
    """Old AutoGPTQ: quantize_config.json beside config.json, no quant_method; weights in two shards."""
    folder = tmp_path / "peer"
    ref = write_peer(folder, "gptq", sym=True)
    config = json.loads((folder / "config.json").read_text())
    quant = config.pop("quantization_config")
    quant.pop("quant_method")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(quant))
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, tok = load_any(folder)
    assert tok is None and torch.allclose(_logits(model, IDS), _logits(ref, IDS), atol=1e-5, rtol=0)


def test_bench_runs_on_a_peer_folder(capsys, tmp_path):
    write_peer(tmp_path / "peer", "gptq", sym=False)
    argv = ["bench", str(tmp_path / "peer"), "--prompt", "8", "--new", "2", "--batches", "1", "--rounds", "1"]
    code, text, err = run_cli(capsys, *argv, "--no-layers", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(text)["scheme"] == "checkpoint"


Q0 = "model.layers.0.self_attn.q_proj"


def _drop(name):
    return lambda t: t.pop(name)


def _permute_g_idx(t):
    name = f"{Q0}.g_idx"
    t[name] = t[name][torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0))].contiguous()


def _unexpected(t):
    t["model.layers.0.mlp.extra.qweight"] = torch.zeros(4, 4, dtype=torch.int32)


def _int_scales(t):
    t[f"{Q0}.scales"] = t[f"{Q0}.scales"].int()


AWQ = {"method": "awq", "sym": False}
BAD = [
    ("unknown-method", {"qcfg": {"quant_method": "bitsandbytes"}}, "quant_method 'bitsandbytes' is not one"),
    ("bits-3", {"qcfg": {"bits": 3}}, "GPTQ bits 3 not supported"),
    ("group-vs-shapes", {"qcfg": {"group_size": 64}}, f"{Q0}.qzeros is [2, 8] I32, expected [1, 8] int32"),
    ("missing-tensor", {"edit": _drop(f"{Q0}.qzeros")}, f"tensor {Q0}.qzeros is missing"),
    ("missing-float", {"edit": _drop("model.norm.weight")}, "tensor model.norm.weight is missing"),
    ("act-order", {"qcfg": {"desc_act": True}, "edit": _permute_g_idx}, "(act-order, desc_act=true)"),
    ("sym-with-zeros", {"sym": False, "qcfg": {"sym": True}}, "other than 8, but the config says sym"),
    ("marlin", {"qcfg": {"checkpoint_format": "marlin"}}, "checkpoint_format 'marlin' not supported"),
    ("awq-gemv", {**AWQ, "qcfg": {"version": "GEMV"}}, "AWQ version 'gemv' not supported"),
    ("awq-no-zero", {**AWQ, "qcfg": {"zero_point": False}}, "zero_point false"),
    ("llm-awq", {**AWQ, "qcfg": {"backend": "llm-awq"}}, "AWQ backend 'llm-awq' not supported"),
    ("awq-versions", {**AWQ, "qcfg": {"format": "gemv"}}, "version 'gemm' and format 'gemv' disagree"),
    ("bits-type", {"qcfg": {"bits": "4"}}, "bits '4' is not an integer"),
    ("unexpected", {"edit": _unexpected}, "tensors that no layer of the model takes"),
    ("scale-dtype", {"edit": _int_scales}, f"{Q0}.scales is [2, 64] I32, expected [2, 64] float16"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_peer_folder_is_refused(tmp_path, kwargs, message):
    write_peer(tmp_path / "peer", **kwargs)
    with pytest.raises(CheckpointError) as e:
        lowbit.load(tmp_path / "peer")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_files_must_agree(tmp_path):
    write_peer(tmp_path / "peer", "gptq")
    (tmp_path / "peer" / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    with pytest.raises(CheckpointError, match="disagree on bits"):
        lowbit.load(tmp_path / "peer")


@pytest.mark.parametrize(
    "qcfg,message",
    [({"quant_method": "hqq"}, "quant_method 'hqq'"), ({"bits": 3}, "bits 3")],
    ids=["hqq", "w3"],
)
def test_cli_refuses_bad_peer_folders_exit_2_one_line(capsys, tmp_path, qcfg, message):
    write_peer(tmp_path / "peer", qcfg=qcfg)
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "peer"), "--task", "wiki-ppl", "--quiet")
    assert code == 2 and out == ""
    assert err.startswith("lowbit: error:") and message in err and err.count("\n") == 1


def test_importers_registry():
    assert {"gptq", "awq"} <= set(IMPORTERS)


@pytest.mark.slow
def test_eval_wiki_ppl_on_a_peer_folder(capsys, tmp_path):
    """``lowbit eval`` reads the tokenizer from the folder (SmolLM2's, with a vocabulary of its size)."""
    from lowbit.models import cached_folder

    source = cached_folder("smollm2-135m", progress=False)
    folder = tmp_path / "peer"
    write_peer(folder, "awq", sym=False, vocab=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    argv = ["eval", str(folder), "--task", "wiki-ppl", "--tokens", "1024", "--quiet", "--json"]
    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert 1 < json.loads(text)["perplexity"] < 1e6  # a random tiny model: about the vocabulary size
