"""`make demo`: quantize the bundled SmolLM2-135M four ways, measure what each costs and buys, and write the
HTML report of the 4-bit model.

Rows: fp32; w8 (int8 weights per channel, round to nearest); w4g128 (int4 weights in groups of 128, AWQ
scales then GPTQ rounding on 32 x 512 calibration tokens); w8a8 (int8 weights and dynamically quantized
int8 activations). Each quantized model is saved and loaded back before it is measured. Size: bytes of
the saved model.safetensors (fp32: its state dict). Perplexity: 8,192 held-out Wikipedia tokens, windows
of 512. Decode: greedy tokens/s at batch 1 after a 128-token prompt, 32 new tokens, all four models
interleaved, median of the rounds, at this machine's thread count.
Usage: python examples/demo.py [--out DIR] [--rounds N] [--json FILE]
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.core.errors import LowbitError
from lowbit.data import calib_batches, eval_tokens
from lowbit.eval.bench import end_to_end
from lowbit.eval.perplexity import perplexity
from lowbit.eval.size import dir_bytes, tensor_bytes
from lowbit.reporting.build import report

MODEL = "smollm2-135m"
CONFIGS = {
    "w8": lambda: lowbit.WeightOnly(bits=8, group_size=None, symmetric=True),
    "w4g128": lambda: lowbit.WeightOnly(bits=4, group_size=128, method="awq+gptq"),
    "w8a8": lambda: lowbit.Int8Dynamic(),
}
METHODS = {"w8": "round to nearest", "w4g128": "AWQ + GPTQ", "w8a8": "round to nearest, dynamic"}


def _quantized(model, tok, out: Path, calib) -> dict:
    """Each scheme quantized, saved under ``out`` and loaded back: {scheme: (model, bytes, seconds)}."""
    done = {}
    for scheme, config in CONFIGS.items():
        q, t0 = copy.deepcopy(model), time.perf_counter()
        lowbit.quantize_(q, config(), calib=calib if scheme == "w4g128" else None)
        seconds = time.perf_counter() - t0
        lowbit.save(q, out / scheme, tokenizer=tok, overwrite=True)
        done[scheme] = (lowbit.load(out / scheme), dir_bytes(out / scheme / "model.safetensors"), seconds)
        print(f"  {scheme}: quantized in {seconds:.0f} s, saved to {out / scheme}", flush=True)
    return done


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | method | size (MB) | vs fp32 | perplexity | decode tok/s | quantize (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['method']} | {r['bytes'] / 1e6:.1f} | {base['bytes'] / r['bytes']:.2f}x | "
            f"{r['perplexity']:.2f} | {r['decode_tok_s']:.1f} | {r['quantize_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo", help="where the checkpoints and the report are written")
    p.add_argument("--rounds", type=int, default=3, help="interleaved decode timing rounds (median)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args()
    t0, out = time.perf_counter(), Path(args.out)
    try:
        model, tok = lowbit.models.load(MODEL, progress=False)
        print(f"{MODEL}: quantizing (w4g128 calibrates on 32 x 512 Wikipedia tokens)", flush=True)
        models = _quantized(model, tok, out, calib_batches(tok, 32, 512))
        tokens = eval_tokens(tok, 8192)
        every = {"fp32": (model, tensor_bytes(model.state_dict()), 0.0), **models}
        speed = end_to_end(
            {k: m for k, (m, _, _) in every.items()}, tokens[None, :128], new=32, rounds=args.rounds
        )
        rows = []
        for scheme, (m, size, seconds) in every.items():
            ppl = perplexity(m, tokens, window=512)
            rows.append({"scheme": scheme, "method": METHODS.get(scheme, "float"), "bytes": size,
                         "perplexity": ppl, "decode_tok_s": speed[scheme]["decode_tok_s"],
                         "quantize_s": seconds})  # fmt: skip
        threads = torch.get_num_threads()
        print(f"\n{MODEL}, {threads} threads, perplexity on 8,192 held-out Wikipedia tokens:")
        print(_table(rows))
        print("Note: SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit, groups of 32), so they already")
        print("lie on a 4-bit grid; g128, w8 and w8a8 are honest tests, 4-bit groups of 32 would flatter.")
        print("\nwriting the report of the w4g128 model ...", flush=True)
        command = f"lowbit report {out / 'w4g128'} --baseline {MODEL} --out {out / 'report'}"
        r = report(
            out / "w4g128", out / "report", baseline=MODEL, overwrite=True, progress=False, command=command
        )
    except LowbitError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {r['path']}/report.html (model card: {r['path']}/MODEL_CARD.md)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
