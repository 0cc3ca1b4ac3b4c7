"""Mixed precision against NNCF's (``nncf.compress_weights`` with ``ratio`` / ``sensitivity_metric``) on
SmolLM2-135M at equal bytes, side by side in one run, in the benchmark environment (``make bench-mixed``).

NNCF: INT4_ASYM groups of 64 for ``--ratio`` of the decoder Linears' weights, INT8_ASYM per channel for the
rest, chosen by its data-aware ``HESSIAN_INPUT_ACTIVATION`` sensitivity on the calibration text; embedding
and tied LM head INT8_ASYM per row (its defaults). lowbit: the same two formats (``w4g64``, ``w8``) chosen
per decoder Linear by ``lowbit.autotune`` (Fisher on the first 16 calibration samples) within NNCF's
stored bytes of those layers, embedding (and tied head) 8-bit asymmetric per row, rounded by RTN (as
NNCF's plain data-aware compression) and by AWQ+GPTQ.
Perplexity on the 8,192 held-out tokens (window 512). Bytes: stored tensors of the decoder blocks' Linears
(codes, scales, zero points), from each model's own state dict.

Run: .venv-bench/bin/python benchmarks/mixed_nncf.py   (results: benchmarks/results/mixed_nncf.json)
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

import lowbit
from lowbit.autotune import Budget, choose, sensitivity_table
from lowbit.data import calib_batches, eval_tokens
from lowbit.eval.perplexity import perplexity

RESULTS = Path(__file__).parent / "results"


def _decoder_bytes(model) -> int:
    """Stored bytes of the decoder blocks' Linear weights and their qparams (NNCF keeps scales and zero
    points in hook modules named after the layer, ``model:layers:3:mlp:down_proj:weight``)."""
    total = 0
    for name, t in model.state_dict().items():
        norm = name.replace(":", ".")
        if ".layers." in norm and "_proj" in norm and "norm" not in norm and "bias" not in norm:
            total += t.nbytes
    return total


def _nncf(model, calib, ratio: float) -> tuple[torch.nn.Module, float]:
    import nncf

    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    q = nncf.compress_weights(
        q,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=64,
        ratio=ratio,
        dataset=nncf.Dataset(calib, lambda x: {"input_ids": x}),
        sensitivity_metric=nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION,
    )
    return q, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--calib", default="64x512")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    n, length = (int(v) for v in args.calib.split("x"))
    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    calib = calib_batches(tok, n, length)
    tokens = eval_tokens(tok, 8192)
    rows = []
    peer, seconds = _nncf(model, calib, args.ratio)
    budget = _decoder_bytes(peer)
    params = sum(
        m.weight.numel() for n_, m in model.named_modules() if ".layers." in n_ and n_.endswith("_proj")
    )
    row = {"name": f"NNCF int4 g64 / int8, ratio {args.ratio}", "decoder_bytes": budget}
    row |= {
        "bits_per_weight": round(8 * budget / params, 3),
        "perplexity": round(perplexity(peer, tokens), 3),
    }
    rows.append(row | {"seconds": round(seconds, 1)})
    print(rows[-1], flush=True)
    del peer
    for method in ("rtn", "awq+gptq"):
        base = lowbit.WeightOnly(
            bits=8, group_size=None, method=method, embedding_bits=8, embedding_group_size=0
        )
        t0 = time.perf_counter()
        table = sensitivity_table(model, calib[:16], ["w4g64", "w8"], base=base, exclude=["lm_head"])
        plan = choose(table, Budget(max_bytes=budget), base)
        q = copy.deepcopy(model)
        lowbit.quantize_(q, plan.config, calib)
        seconds = time.perf_counter() - t0
        stored = _decoder_bytes(q)
        row = {"name": f"lowbit autotune w4g64 / w8, {method}", "decoder_bytes": stored}
        row |= {
            "bits_per_weight": round(8 * stored / params, 3),
            "perplexity": round(perplexity(q, tokens), 3),
        }
        rows.append(row | {"seconds": round(seconds, 1), "counts": plan.counts()})
        print(rows[-1], flush=True)
    import nncf

    record = {
        "command": "python benchmarks/mixed_nncf.py",
        "nncf": nncf.__version__,
        "calib": f"wiki:{args.calib}",
    }
    record |= {"fp32": 21.24, "rows": rows, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_nncf.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
