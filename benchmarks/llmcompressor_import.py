"""llm-compressor's own compressed-tensors output loaded by lowbit (`lowbit.load`), against
llm-compressor's model in memory (its own fake-quantized forward, the producer's dequantization).

For each recipe on SmolLM2-135M (fp32; `lm_head` ignored, as llm-compressor's examples do):
  gptq-w4g64       GPTQModifier, 4-bit asymmetric, groups of 64, --samples x 512 calibration tokens
  gptq-w4g64-sym   the same, symmetric
  w8a8             QuantizationModifier, preset W8A8 (int8 per channel, int8 dynamic per-token activations)
1. `oneshot`, then `save_pretrained(folder, save_compressed=True)` (pack-quantized / int-quantized).
2. `lowbit.load(folder)`: the Linear weights are compared with llm-compressor's dequantized ones
   (max abs difference), and perplexity (windows of 512, --tokens held-out Wikipedia tokens) of both.
W8A8 activations: llm-compressor quantizes each token symmetrically, lowbit's imported QDynamicLinear
asymmetrically (lowbit's rule), so only its weights are expected to match exactly.
Groups of 64: SmolLM2's 576 hidden inputs are not whole groups of 128. Needs `make bench-venv`.
Usage: .venv-bench/bin/python benchmarks/llmcompressor_import.py [--work DIR] [--samples N] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ("gptq-w4g64", "gptq-w4g64-sym", "w8a8")
NOTE = (
    "Weights: lowbit's repacked Linears against llm-compressor's dequantization of the same layers. W8A8's "
    "perplexities differ by the activation rule: llm-compressor quantizes each token symmetrically, lowbit's "
    "imported QDynamicLinear asymmetrically (lowbit's own rule)."
)


def _recipe(name: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if name == "w8a8":
        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    sym = name.endswith("-sym")
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=64)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def _dequantized(model) -> dict[str, torch.Tensor]:
    """llm-compressor's dequantized Linear weights (its own fake-quantization of the stored weight)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            zp = getattr(m, "weight_zero_point", None)
            out[name] = fake_quantize(m.weight.detach(), m.weight_scale, zp, scheme.weights)
    return out


def run(name: str, work: Path, samples: int, tokens: torch.Tensor) -> dict:
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    import lowbit
    from lowbit.data import calib_batches
    from lowbit.eval.perplexity import perplexity

    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    rows = [
        {"input_ids": b[0], "attention_mask": torch.ones_like(b[0])} for b in calib_batches(tok, samples, 512)
    ]
    oneshot(model=model, tokenizer=tok, dataset=DataLoader(rows, batch_size=1), recipe=_recipe(name),
            num_calibration_samples=len(rows))  # fmt: skip
    theirs = _dequantized(model)
    ppl_theirs = perplexity(model, tokens, window=512)
    folder = work / name
    model.save_pretrained(str(folder), save_compressed=True)
    tok.save_pretrained(str(folder))
    ours = lowbit.load(folder)
    diff = max(float((ours.get_submodule(k).dequantized_weight() - w).abs().max()) for k, w in theirs.items())
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    row = {"recipe": name, "layers": len(theirs), "max_weight_diff": diff, "format": qc["format"],
           "ppl_llmcompressor": ppl_theirs}  # fmt: skip
    row["ppl_lowbit_import"] = perplexity(ours, tokens, window=512)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--work", default=str(ROOT / "out" / "llmc-import"), help="llm-compressor's output folders"
    )
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration samples of 512 tokens")
    p.add_argument("--tokens", type=int, default=8192, help="held-out Wikipedia tokens for perplexity")
    p.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES)
    )
    args = p.parse_args()
    import lowbit
    from lowbit.data import eval_tokens

    _, tok = lowbit.models.load("smollm2-135m", progress=False)
    tokens = eval_tokens(tok, args.tokens)
    rows = [run(n, Path(args.work), args.samples, tokens) for n in args.recipes.split(",")]
    env = {"torch": torch.__version__, "llmcompressor": version("llmcompressor"), "tokens": args.tokens,
           "compressed_tensors": version("compressed-tensors"), "samples": args.samples}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llmcompressor_import.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [
        "# llm-compressor's compressed-tensors output loaded by lowbit",
        "",
        "SmolLM2-135M; `.venv-bench/bin/python benchmarks/llmcompressor_import.py "
        f"{' '.join(sys.argv[1:])}` (llm-compressor {env['llmcompressor']}, "
        f"compressed-tensors {env['compressed_tensors']}); perplexity "
        f"on {args.tokens} held-out Wikipedia tokens, windows of 512.",
        "",
        "| recipe | format | layers | max weight diff | llm-compressor ppl | lowbit import ppl |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['recipe']} | {r['format']} | {r['layers']} | {r['max_weight_diff']:.2e} | "
        f"{r['ppl_llmcompressor']:.4f} | {r['ppl_lowbit_import']:.4f} |"
        for r in rows
    ]
    lines += ["", NOTE]
    (RESULTS / "llmcompressor_import.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
