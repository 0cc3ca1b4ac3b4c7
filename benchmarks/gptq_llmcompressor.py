"""GPTQ side by side: lowbit vs llm-compressor's ``GPTQModifier`` on SmolLM2-135M (fp32, CPU).

Same model, calibration batches and evaluation for both, in one run:

| what          | both                                                                                  |
|---------------|---------------------------------------------------------------------------------------|
| model         | the bundled fp32 SmolLM2-135M (``lowbit.models.load``), a fresh copy per variant       |
| layers        | the decoder Linears (210); embedding and tied LM head stay float                       |
| scheme        | int4 asymmetric, one scale + zero point per GROUP input columns (64, 128)              |
| GPTQ          | dampening 0.01 x mean diag(H), columns in descending diag(H) order with static groups |
|               | (llm-compressor's default ``actorder="static"``, lowbit's ``act_order=True``)          |
| calibration   | ``lowbit.data.calib_batches(tok, SAMPLES, SEQ_LEN)``, disjoint from the eval text      |
| perplexity    | ``lowbit.eval.perplexity`` on ``eval_tokens(tok, 8192)``, window 512                   |

llm-compressor runs ``oneshot`` (its sequential pipeline, default batch size 1, minmax weight observer);
lowbit runs ``quantize_`` with ``WeightOnly(method="gptq")`` (block-by-block pipeline, its default
``mse_clip=True``; variant ``lowbit-minmax`` turns it off). lowbit's default ``compute_dtype="auto"``
runs the calibration forwards in bfloat16 on CPUs with native bf16 matmuls (AMX here), Hessians from
bf16 inputs with float32 sums, rounding in float32; variant ``lowbit-fp32`` runs them in float32,
llm-compressor's arithmetic on an fp32 model. Variant ``llmcompressor-bf16`` gives llm-compressor the
same kind of speed-up: the model is cast to bfloat16 for ``oneshot`` (its Hessians and rounding stay
float32) and back to float32 to be evaluated. Seconds: wall time of that one call, model loading and
evaluation excluded. Each variant runs in its own process (clean peak RSS, no state shared); peak RSS
is ``ru_maxrss`` after quantizing (loading included). The 1-minute load average before and after each
variant is recorded: on a shared machine compare seconds within one run only.
Writes benchmarks/results/gptq_llmcompressor.{json,md}. Needs ``make bench-venv``.
Run: make bench-gptq, or .venv-bench/bin/python benchmarks/gptq_llmcompressor.py --samples 4 --seq-len 128
"""

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
KINDS = ("fp32", "llmcompressor", "llmcompressor-bf16", "lowbit", "lowbit-fp32", "lowbit-minmax")
EXCLUDE = ("model.embed_tokens", "lm_head")


def _llmcompressor(model, tok, batches: list, group: int) -> int:
    """llm-compressor ``oneshot`` + ``GPTQModifier``; returns the number of quantized Linears."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)
    rows = [{"input_ids": b[0], "attention_mask": torch.ones_like(b[0])} for b in batches]
    loader = DataLoader(rows, batch_size=1)  # oneshot's own default batch size
    oneshot(model=model, tokenizer=tok, dataset=loader, recipe=recipe, num_calibration_samples=len(rows))
    return sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)


def _lowbit(model, batches: list, group: int, mse_clip: bool, compute: str) -> int:
    import lowbit

    config = lowbit.WeightOnly(bits=4, group_size=group, method="gptq", damp=0.01, act_order=True,
                               mse_clip=mse_clip, compute_dtype=compute)  # fmt: skip
    return len(lowbit.quantize_(model, config, calib=batches, exclude=EXCLUDE).quantized)


def child(kind: str, group: int, samples: int, seq_len: int, eval_n: int) -> dict:
    """Load, quantize (timed), evaluate one variant in this process."""
    import lowbit
    from lowbit.data import calib_batches, eval_tokens
    from lowbit.eval import perplexity

    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    batches = calib_batches(tok, samples, seq_len)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    if kind.startswith("llmcompressor"):
        if kind.endswith("bf16"):
            model.to(torch.bfloat16)
        layers = _llmcompressor(model, tok, batches, group)
    elif kind.startswith("lowbit"):
        compute = "float32" if kind == "lowbit-fp32" else "auto"
        layers = _lowbit(model, batches, group, mse_clip=kind != "lowbit-minmax", compute=compute)
    else:
        layers = 0
    seconds = time.perf_counter() - t0
    model.float()
    row = {"variant": kind if kind == "fp32" else f"{kind} w4g{group}", "kind": kind, "group": group}
    row |= {"layers": layers, "seconds": round(seconds, 1), "load_before": load0}
    row["load_after"] = os.getloadavg()[0]
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    row["ppl"] = round(perplexity(model, eval_tokens(tok, eval_n), window=512), 3)
    return row


def _run_child(kind: str, group: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--groups", str(group), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--eval-tokens", str(args.eval_tokens)]  # fmt: skip
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        error = f"exit {proc.returncode}"
        return {"variant": f"{kind} w4g{group}", "kind": kind, "group": group, "error": error}
    row = json.loads(lines[-1])
    print(json.dumps(row), flush=True)
    return row


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="calibration samples (the issue: 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--groups", type=int, nargs="+", default=[64], help="the issue quotes w4g64")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=KINDS,
        default=["fp32", "llmcompressor", "llmcompressor-bf16", "lowbit", "lowbit-fp32"],
    )
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="gptq_llmcompressor", help="results file stem in benchmarks/results")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.groups[0], args.samples, args.seq_len, args.eval_tokens)))
        return 0
    t0 = time.perf_counter()
    rows = [_run_child("fp32", 0, args)] if "fp32" in args.variants else []
    for g in args.groups:
        rows += [_run_child(k, g, args) for k in args.variants if k != "fp32"]
    env = {
        "torch": torch.__version__,
        "llmcompressor": _version("llmcompressor"),
        "compressed-tensors": _version("compressed-tensors"),
        "transformers": _version("transformers"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "eval_tokens": args.eval_tokens,
        "seconds": round(time.perf_counter() - t0),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


def markdown(rows: list[dict], env: dict) -> str:
    out = [
        f"SmolLM2-135M fp32, int4 asymmetric group GPTQ of the decoder Linears, {env['samples']} x "
        f"{env['seq_len']} calibration tokens, perplexity on {env['eval_tokens']} held-out Wikipedia tokens "
        f"(window 512). CPU, {env['threads']} threads; seconds = the quantization call only.\n",
        "| variant | Linears | ppl | seconds | vs llm-compressor | vs llm-compressor bf16 | peak RSS MiB "
        "| load avg before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = [
        {r["group"]: r["seconds"] for r in rows if r["kind"] == kind and "error" not in r}
        for kind in ("llmcompressor", "llmcompressor-bf16")
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        speed = [
            f"{p[r['group']] / r['seconds']:.2f}x" if r["group"] in p and r["seconds"] else "-" for p in peers
        ]
        secs = f"{r['seconds']:.1f}" if r["kind"] != "fp32" else "-"
        load = f"{r['load_before']:.1f} / {r['load_after']:.1f}"
        out.append(f"| {r['variant']} | {r['layers']} | {r['ppl']:.2f} | {secs} | {speed[0]} | {speed[1]} | "
                   f"{r['peak_rss_mib']} | {load} |")  # fmt: skip
    return "\n".join(out) + f"\n\n{json.dumps(env)}\n"


if __name__ == "__main__":
    sys.exit(main())
