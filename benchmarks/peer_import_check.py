"""GPTQ and AWQ folders packed by their producers' own code, loaded by lowbit, checked against the
producers' own dequantization.

For each case a tiny random Llama (hidden 64, intermediate 128, 2 layers, the tests' shape) gets random
codes ``q``, zero points ``z`` and float16 scales ``s`` for its 14 decoder Linears; the producer packs
them from the float weight ``(q - z) * s`` and the packed tensors are written as a Hugging Face folder
(config.json with ``quantization_config``), which ``lowbit.load`` repacks into ``QLinear`` layers.

| producer | packs with                                         | dequantizes with                        |
|----------|----------------------------------------------------|-----------------------------------------|
| AutoGPTQ | ``qlinear_cuda_old.QuantLinear.pack`` (v1 format), | its ``forward`` on the identity (torch  |
|          | from a float16 Linear                              | path, no CUDA extension)                |
| AutoAWQ  | ``WQLinear_GEMM.from_linear``                      | ``packing_utils.dequantize_gemm``       |

Both producers dequantize in float16 (``(q - z) * s`` rounded to float16); lowbit in float32, exactly.
Reported per case: the largest |lowbit - producer| over all weights (absolute, and relative to the
largest weight), the same after rounding lowbit's weights to float16 (0: bit-identical to the producer)
and against the producer's code run with float32 scales (0: the same numbers), and the largest logit
difference of the lowbit model against float models holding the producer's weights (float16, float32).
Zero points are drawn from 1..2**bits-1: AutoGPTQ's v1 packing of ``z = 0`` (stored as ``z - 1 = -1``)
spills into the higher fields of its word.

Needs auto-gptq 0.7.1 and autoawq 0.2.9 in .venv-bench (benchmarks/requirements-bench.txt, ``make
bench-venv``; or ``.venv-bench/bin/pip install --no-deps -c constraints.txt auto-gptq==0.7.1
autoawq==0.2.9``). ``import auto_gptq`` fails under transformers 5 (it imports ``no_init_weights``), so
its ``qlinear_cuda_old.py`` is loaded by file path; a producer that is not installed is skipped with a
message. Writes benchmarks/results/peer_import.{json,md}.
Run: make bench-peers, or .venv-bench/bin/python benchmarks/peer_import_check.py
"""

import copy
import importlib.metadata
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.nn.modules import QLinear

RESULTS = Path(__file__).parent / "results"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [  # (name, producer, bits, group_size, sym)
    ("gptq-w4g32-sym", "autogptq", 4, 32, True),
    ("gptq-w4g32-asym", "autogptq", 4, 32, False),
    ("gptq-w8-per-channel-sym", "autogptq", 8, -1, True),
    ("gptq-w2g64-asym", "autogptq", 2, 64, False),
    ("awq-w4g32", "autoawq", 4, 32, False),
    ("awq-w4g64", "autoawq", 4, 64, False),
]


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _autogptq_linear():
    """AutoGPTQ's ``QuantLinear`` (qlinear_cuda_old) loaded from its file, or None if not installed."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    module_spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda_old", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


def _autoawq():
    """(``WQLinear_GEMM``, ``dequantize_gemm``) of AutoAWQ, or None if not installed."""
    if importlib.util.find_spec("awq") is None:
        return None
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    return WQLinear_GEMM, dequantize_gemm


def _draw(n_in: int, n_out: int, bits: int, group: int, sym: bool, gen) -> tuple:
    """(z (groups, out), s float16 (groups, out), float weight (out, in) = (q - z) * s)."""
    size = n_in if group == -1 else group
    groups = math.ceil(n_in / size)
    q = torch.randint(0, 2**bits, (n_out, n_in), generator=gen)
    if sym:
        z = torch.full((groups, n_out), 2 ** (bits - 1))
    else:
        z = torch.randint(1, 2**bits, (groups, n_out), generator=gen)
    s = ((torch.rand(groups, n_out, generator=gen) * 0.05 + 0.01) * 2.0 ** (4 - bits)).half()  # |w| < 1
    g = torch.arange(n_in) // size
    return z, s, (q - z.t()[:, g]).float() * s.float().t()[:, g]


def _gptq_pack(quant_linear, linear: nn.Linear, bits: int, group: int, z, s) -> tuple[dict, tuple]:
    """AutoGPTQ's tensors for ``linear`` and its own dequantization ``(out, in)``: as it runs (float16)
    and with its scales cast to float32."""
    n_in, n_out = linear.in_features, linear.out_features
    layer = quant_linear(bits, group, n_in, n_out, False)
    size = n_in if group == -1 else group
    g_idx = torch.arange(n_in, dtype=torch.int32) // size
    half = nn.Linear(n_in, n_out, bias=False, dtype=torch.float16)  # AutoGPTQ stores the model's dtype
    half.weight.data = linear.weight.data.half()
    layer.pack(half, s.t().clone(), z.t().clone(), g_idx)
    tensors = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": layer.g_idx}
    with torch.no_grad():
        w16 = layer(torch.eye(n_in, dtype=torch.float16)).t()
        layer.scales = layer.scales.float()
        w32 = layer(torch.eye(n_in)).t()
    return tensors, (w16, w32)


def _awq_pack(awq, linear: nn.Linear, bits: int, group: int, z, s) -> tuple[dict, tuple]:
    """AutoAWQ's tensors for ``linear`` and its own dequantization ``(out, in)``: as it runs (float16)
    and with its scales cast to float32."""
    gemm, dequantize_gemm = awq
    layer = gemm.from_linear(linear, bits, group, scales=s.float(), zeros=z.clone())
    w16 = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, bits, group).t()
    w32 = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales.float(), bits, group).t()
    return {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales}, (w16, w32)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def run_case(folder: Path, producer, kind: str, bits: int, group: int, sym: bool) -> dict:
    """Pack with ``producer``, write ``folder``, load it with lowbit, compare; returns the row."""
    gen = torch.Generator().manual_seed(0)
    model = _tiny_llama()
    tensors, theirs = {}, {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            z, s, w = _draw(m.in_features, m.out_features, bits, group, sym, gen)
            m.weight.data = w
            pack = _gptq_pack if kind == "autogptq" else _awq_pack
            packed, theirs[name] = pack(producer, m, bits, group, z, s)
            tensors |= {f"{name}.{k}": v.contiguous() for k, v in packed.items()}
    for name, p in model.named_parameters():
        if not name.startswith("lm_head") and not any(f".{n}." in name for n in LINEARS):
            tensors[name] = p.detach().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if kind == "autogptq":
        quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": False,
                 "checkpoint_format": "gptq"}  # fmt: skip
    else:
        quant = {
            "quant_method": "awq",
            "bits": bits,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
        }
    (folder / "config.json").write_text(json.dumps(model.config.to_dict() | {"quantization_config": quant}))
    ours = lowbit.load(folder)
    return _compare(ours, model, theirs)


def _compare(ours: nn.Module, float_model: nn.Module, theirs: dict[str, tuple]) -> dict:
    """Largest weight differences of lowbit's layers against the producer's float16 and float32
    dequantization, and of the logits against float models holding the producer's weights."""
    diff = diff16 = diff32 = top = 0.0
    models = {16: float_model, 32: copy.deepcopy(float_model)}
    for name, (w16, w32) in theirs.items():
        mine = ours.get_submodule(name)
        assert isinstance(mine, QLinear), name
        d = mine.dequantized_weight()
        diff = max(diff, float((d - w16.float()).abs().max()))
        diff16 = max(diff16, float((d.half() - w16).abs().max()))
        diff32 = max(diff32, float((d - w32).abs().max()))
        top = max(top, float(w32.abs().max()))
        models[16].get_submodule(name).weight.data = w16.float()
        models[32].get_submodule(name).weight.data = w32
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids).logits
        rel = {b: float((got - m(ids).logits).abs().max() / got.abs().max()) for b, m in models.items()}
    return {"layers": len(theirs), "max_abs_diff": diff, "max_rel_diff": diff / top,
            "max_abs_diff_fp16": diff16, "max_abs_diff_fp32": diff32,
            "logits_max_rel_diff": rel[16], "logits_max_rel_diff_fp32": rel[32]}  # fmt: skip


def main() -> int:
    producers = {"autogptq": _autogptq_linear(), "autoawq": _autoawq()}
    for kind, found in producers.items():
        if found is None:
            print(f"peer_import_check: {kind} is not installed; its cases are skipped (see the docstring)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, bits, group, sym in CASES:
            if producers[kind] is None:
                continue
            folder = Path(tmp) / name
            folder.mkdir()
            row = run_case(folder, producers[kind], kind, bits, group, sym)
            rows.append(
                {"case": name, "producer": kind, "bits": bits, "group_size": group, "sym": sym, **row}
            )
    if not rows:
        print("peer_import_check: no producer installed; nothing measured")
        return 0
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    env |= {name: _version(name) for name in ("transformers", "auto-gptq", "autoawq")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peer_import.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (RESULTS / "peer_import.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


def markdown(rows: list[dict], env: dict) -> str:
    out = [
        "# GPTQ and AWQ checkpoints imported by lowbit\n",
        "`make bench-peers` (`.venv-bench/bin/python benchmarks/peer_import_check.py`).\n",
        "Peer checkpoints packed by their producers, loaded by `lowbit.load`, against the producers' own "
        "dequantization: as they run it (float16) and with their scales cast to float32 (fp32 producer). "
        "\"lowbit in fp16\": lowbit's weights rounded to float16 against the producer's float16 ones. "
        "Tiny random Llama, 14 quantized Linears per case.\n",
        "| case | producer | weights: max abs diff | max rel diff | lowbit in fp16 | vs fp32 producer "
        "| logits: max rel diff | vs fp32 producer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['case']} | {r['producer']} | {r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} | "
                   f"{r['max_abs_diff_fp16']:.2e} | {r['max_abs_diff_fp32']:.2e} | "
                   f"{r['logits_max_rel_diff']:.2e} | {r['logits_max_rel_diff_fp32']:.2e} |")  # fmt: skip
    return "\n".join(out) + f"\n\n{json.dumps(env)}\n"


if __name__ == "__main__":
    sys.exit(main())
