"""lowbit's compressed-tensors export read back by Hugging Face transformers (with compressed-tensors):
perplexity of transformers' run of each exported folder against lowbit's own run of the checkpoint,
and lowbit's import of the same folder.

For each scheme (SmolLM2-135M; checkpoints in --work, each made once by `lowbit quantize` with the
options below and reused):
  awq+gptq-w4g64      AWQ + GPTQ, 4-bit asymmetric, groups of 64, 32 x 512 Wikipedia calibration tokens
  awq+gptq-w4g64-sym  the same, symmetric
  w8a8                int8 weights per channel, int8 dynamic per-token activations (round to nearest)
1. `lowbit export CKPT --format compressed-tensors`.
2. transformers `AutoModelForCausalLM.from_pretrained(folder)`; asymmetric folders with
   `CompressedTensorsConfig(dequantize=True)` (transformers' compressed route builds unpacked zero points
   and refuses the packed ones, for llm-compressor's asymmetric outputs as well).
3. Perplexity (windows of 512, --tokens held-out Wikipedia tokens) of lowbit's checkpoint, of
   transformers' model and of `lowbit.load(folder)`; sizes of the checkpoint and of the folder.
Groups of 64, not 128: SmolLM2's 576 hidden inputs are 4.5 groups of 128, and compressed-tensors
needs whole groups. SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit, groups of 32), so 4-bit
results start from weights already on a 4-bit grid.
Usage: python benchmarks/compressed_tensors_hf.py [--work DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMES = {
    "awq+gptq-w4g64": ("w4g64", "awq+gptq", "wiki:32x512"),
    "awq+gptq-w4g64-sym": ("w4g64-sym", "awq+gptq", "wiki:32x512"),
    "w8a8": ("w8a8", None, None),
}


def _checkpoint(work: Path, name: str) -> Path:
    from lowbit.workflows import quantize_and_save

    path = work / name
    if not (path / "quant_config.json").is_file():
        scheme, method, calib = SCHEMES[name]
        t0 = time.perf_counter()
        quantize_and_save("smollm2-135m", scheme, path, method=method, calib=calib, progress=False)
        print(f"{name}: quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def measure(work: Path, name: str, tokens: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import lowbit
    from lowbit.eval.perplexity import perplexity
    from lowbit.exporting import export

    ckpt = _checkpoint(work, name)
    folder = work / f"{name}-ct"
    stats = export(ckpt, "compressed-tensors", folder, overwrite=True)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    asym = any(not g["weights"]["symmetric"] for g in qc["config_groups"].values())
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    ours = lowbit.load(ckpt)
    row = {"scheme": name, "format": qc["format"], "hf_dequantize_at_load": asym,
           "lowbit_bytes": _folder_bytes(ckpt), "ct_bytes": stats["bytes"],
           "float_embeddings": stats["float_embeddings"]}  # fmt: skip
    row["ppl_lowbit"] = perplexity(ours, tokens, window=512)
    row["ppl_transformers"] = perplexity(hf, tokens, window=512)
    del hf
    row["ppl_lowbit_import"] = perplexity(lowbit.load(folder), tokens, window=512)
    row["rel_diff_transformers"] = row["ppl_transformers"] / row["ppl_lowbit"] - 1
    row["rel_diff_import"] = row["ppl_lowbit_import"] / row["ppl_lowbit"] - 1
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# compressed-tensors export read by Hugging Face transformers",
        "",
        f"SmolLM2-135M, perplexity on {env['tokens']} held-out Wikipedia tokens (windows of 512). "
        "`python benchmarks/compressed_tensors_hf.py` (`make bench-ct`). SmolLM2's bundled weights come "
        "from a Q4_1 GGUF (4-bit, groups of 32), so the 4-bit rows start from weights already on a 4-bit "
        "grid.",
        "",
        "| scheme | format | lowbit ppl | transformers ppl | diff | lowbit import ppl | lowbit MB "
        "| folder MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['format']} | {r['ppl_lowbit']:.4f} | {r['ppl_transformers']:.4f} | "
            f"{100 * r['rel_diff_transformers']:+.4f}% | {r['ppl_lowbit_import']:.4f} | "
            f"{r['lowbit_bytes'] / 1e6:.1f} | {r['ct_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        "The folders store the quantized embedding as float (vLLM and transformers have no quantized "
        "embedding in compressed-tensors), hence their larger size; the Linear weights are lowbit's codes. "
        "Asymmetric folders load in transformers with `CompressedTensorsConfig(dequantize=True)`.",
        "",
        f"Environment: torch {env['torch']}, transformers {env['transformers']}, compressed-tensors "
        f"{env['compressed_tensors']}, {env['threads']} threads.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / "out" / "ct-bench"), help="checkpoints and exported folders")
    p.add_argument("--tokens", type=int, default=8192, help="held-out Wikipedia tokens for perplexity")
    p.add_argument(
        "--schemes", default=",".join(SCHEMES), help="comma-separated subset of " + ", ".join(SCHEMES)
    )
    args = p.parse_args()
    import compressed_tensors
    import transformers

    from lowbit.data import eval_tokens
    from lowbit.models import load

    _, tok = load("smollm2-135m", progress=False)
    tokens = eval_tokens(tok, args.tokens)
    work = Path(args.work)
    rows = [measure(work, name, tokens) for name in args.schemes.split(",")]
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "tokens": args.tokens,
           "compressed_tensors": compressed_tensors.__version__,
           "threads": torch.get_num_threads()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compressed_tensors_hf.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (RESULTS / "compressed_tensors_hf.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
