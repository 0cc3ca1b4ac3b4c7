"""SmolLM2-135M greedy decode on the CPU, batch 1: float32, lowbit, torchao and optimum-quanto side by side.

Writes benchmarks/results/decode_cpu.{json,md}. Needs the benchmark environment (``make bench-venv``:
torchao and optimum-quanto pinned in benchmarks/requirements-bench.txt, torch held at 2.13.0); a peer
that is not installed or fails on this model is reported as such, not skipped silently.

Each variant is its own copy of the real model. Per round, every variant runs (in turn) a 128-token
prompt from held-out Wikipedia text: prefill alone, then prefill + NEW greedy tokens with the KV cache;
decode tokens/s = NEW / (the difference). Medians over rounds. ``agree`` is the fraction of the greedy
tokens equal to float32's (a quick sanity check, not an accuracy claim; perplexity is benchmarks/rtn_schemes).
Run: .venv-bench/bin/python benchmarks/decode_cpu.py
"""

import argparse
import copy
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import lowbit
from lowbit.data import eval_tokens

RESULTS = Path(__file__).parent / "results"


def _lowbit(config):
    def apply(model):
        lowbit.quantize_(model, config)

    return apply


def _torchao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())


def _quanto(bits):
    def apply(model):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights=qint8 if bits == 8 else qint4)
        freeze(model)

    return apply


VARIANTS = {
    "fp32": None,
    "lowbit w8": _lowbit(lowbit.WeightOnly(bits=8, group_size=None, symmetric=True)),
    "lowbit w4g128": _lowbit(lowbit.WeightOnly(bits=4, group_size=128)),
    "lowbit w4g128e8": _lowbit(lowbit.parse_scheme("w4g128e8")),
    "lowbit w8a8 dynamic": _lowbit(lowbit.Int8Dynamic()),
    "torchao int8 weight-only": _torchao_int8,
    "quanto int8": _quanto(8),
    "quanto int4": _quanto(4),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _generate(model, ids, new):
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = p.parse_args()
    t0 = time.perf_counter()
    base, tok = lowbit.models.load("smollm2-135m")
    ids = eval_tokens(tok, args.prompt)[None, :]
    models, errors = {}, {}
    for name in args.variants:
        m = copy.deepcopy(base)
        try:
            if VARIANTS[name] is not None:
                VARIANTS[name](m)
            with torch.no_grad():  # not inference_mode: quanto int4 refuses inference tensors
                _generate(m, ids, 2)
            models[name] = m
        except Exception as e:  # a peer that cannot run this model is a result, not a crash
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
    del base
    prefill, total, tokens = {n: [] for n in models}, {n: [] for n in models}, {}
    with torch.no_grad():  # not inference_mode: quanto int4 refuses inference tensors
        for _ in range(args.rounds):
            for name, m in models.items():
                s = time.perf_counter()
                m(ids)
                prefill[name].append(time.perf_counter() - s)
                s = time.perf_counter()
                tokens[name] = _generate(m, ids, args.new)
                total[name].append(time.perf_counter() - s)
    rows = []
    for name in models:
        pf, tt = statistics.median(prefill[name]), statistics.median(total[name])
        agree = float((tokens[name] == tokens["fp32"]).float().mean()) if "fp32" in tokens else None
        rows.append(
            {
                "variant": name,
                "prefill_tok_s": round(args.prompt / pf, 1),
                "decode_tok_s": round(args.new / max(tt - pf, 1e-9), 2),
                "agree_with_fp32": agree,
            }
        )
    rows += [{"variant": n, "error": e} for n, e in errors.items()]
    env = {
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "optimum-quanto": _version("optimum-quanto"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0),
        "prompt": args.prompt,
        "new": args.new,
        "rounds": args.rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_cpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (RESULTS / "decode_cpu.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


def markdown(rows: list[dict], env: dict) -> str:
    fp = next((r for r in rows if r["variant"] == "fp32"), None)
    out = [
        f"SmolLM2-135M, batch 1, {env['prompt']}-token prompt, {env['new']} greedy tokens, CPU "
        f"({env['threads']} threads), median of {env['rounds']} interleaved rounds.\n",
        "| variant | decode tok/s | vs fp32 | prefill tok/s | vs fp32 | greedy tokens = fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        d = r["decode_tok_s"] / fp["decode_tok_s"] if fp else float("nan")
        pf = r["prefill_tok_s"] / fp["prefill_tok_s"] if fp else float("nan")
        agree = f"{r['agree_with_fp32']:.0%}" if r["agree_with_fp32"] is not None else "-"
        dec, pre = f"{r['decode_tok_s']:.1f} | {d:.2f}x", f"{r['prefill_tok_s']:.0f} | {pf:.2f}x"
        out.append(f"| {r['variant']} | {dec} | {pre} | {agree} |")
    return "\n".join(out) + f"\n\n{json.dumps(env)}\n"


if __name__ == "__main__":
    sys.exit(main())
