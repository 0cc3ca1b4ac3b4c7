"""What ``Decoder(dot="int8")`` costs in quality: SmolLM2-135M perplexity through the fast decode path.

For each window of WINDOW held-out Wikipedia tokens (``lowbit.data.eval_tokens``): the first half is the
prompt (one ``prefill``: its last position predicts the next token), then the second half is fed token by
token (``step``, teacher forcing), each step predicting the next token. Perplexity = exp(mean NLL) over
those predictions, for the quantized model's plain Hugging Face forward (the exact reference, same
positions), ``Decoder(dot="float")`` (should equal it to float rounding) and ``Decoder(dot="int8")``
(activations rounded to int8 per 32 values in every quantized linear, prompt and steps), beside fp32.
Weights: w4g128 (RTN, symmetric) and w8 (per channel). SmolLM2's weights already lie on a 4-bit g32 grid,
so g128 is not a free ride, and 8 bits is nearly lossless either way.

Writes benchmarks/results/decode_int8_quality.{json,md}. Run: make bench-speed, or
.venv/bin/python benchmarks/decode_int8_quality.py [--windows 16] [--window 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.data import eval_tokens
from lowbit.decode import Decoder

RESULTS = Path(__file__).parent / "results"
SCHEMES = {
    "w4g128": lambda: lowbit.WeightOnly(bits=4, group_size=128),
    "w8": lambda: lowbit.WeightOnly(bits=8, group_size=None),
}


def plain_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """NLL (windows, W/2) of tokens W/2 .. W-1 of each window, from the plain forward over the window."""
    half = windows.shape[1] // 2
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, half - 1 : -1].float()
            out.append(F.cross_entropy(logits, w[half:], reduction="none"))
    return torch.stack(out)


def decoder_nll(dec: Decoder, windows: torch.Tensor) -> torch.Tensor:
    """The same NLL through ``dec``: prefill of the first half, then one step per token of the second."""
    half = windows.shape[1] // 2
    out = []
    for w in windows:
        logits = [dec.prefill(w[None, :half])]
        logits += [dec.step(w[None, i : i + 1]) for i in range(half, w.shape[0] - 1)]
        out.append(F.cross_entropy(torch.cat(logits).float(), w[half:], reduction="none"))
    return torch.stack(out)


def _ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=256)
    args = p.parse_args()
    base, tok = lowbit.models.load("smollm2-135m", progress=False)
    windows = eval_tokens(tok, args.windows * args.window).view(args.windows, args.window)
    start = time.time()
    fp32 = plain_nll(base, windows)
    rows = [{"model": "fp32", "path": "plain forward", "ppl": _ppl(fp32), "max_abs_nll_diff": 0.0}]
    for name, cfg in SCHEMES.items():
        m = copy.deepcopy(base)
        lowbit.quantize_(m, cfg())
        ref = plain_nll(m, windows)
        rows.append({"model": name, "path": "plain forward", "ppl": _ppl(ref), "max_abs_nll_diff": 0.0})
        for dot in ("float", "int8"):
            dec = Decoder(m, cache_len=args.window, dot=dot)
            nll = decoder_nll(dec, windows)
            diff = float((nll - ref).abs().max())
            rows.append({"model": name, "path": f"Decoder dot={dot} ({dec.engine})", "ppl": _ppl(nll),
                         "max_abs_nll_diff": diff})  # fmt: skip
        print(rows[-3:], flush=True)
    n = args.windows * (args.window // 2)
    env = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "predictions": n,
           "seconds": round(time.time() - start), "torch": torch.__version__}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_int8_quality.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    md = [
        f"# SmolLM2-135M: perplexity through the fast decode path ({env['date']})",
        "",
        f"`{env['command']}`: {args.windows} windows of {args.window} held-out Wikipedia tokens; the first "
        f"half of each is the prompt, the {n} tokens of the second halves are predicted (prompt's last "
        "position, then one decode step per token). `max |dNLL|`: the largest per-token NLL difference "
        "from the same model's plain forward.",
        "",
        "| weights | path | perplexity | max abs dNLL |",
        "|---|---|---:|---:|",
    ]
    md += [f"| {r['model']} | {r['path']} | {r['ppl']:.3f} | {r['max_abs_nll_diff']:.2e} |" for r in rows]
    (RESULTS / "decode_int8_quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
