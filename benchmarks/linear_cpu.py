"""One Linear layer on the CPU: float32 vs lowbit's quantized backends, through ``lowbit.quantize_``.

Writes benchmarks/results/linear_cpu.{json,md}. All candidates of a (shape, batch) are timed side by
side in interleaved rounds (``lowbit.eval.latency.compare``), medians in microseconds. Two settings:
warm (the same layer called again and again, weights in cache: what the issue's single-layer target
measures, and what flatters small weights) and cold (copies of the layer cycled so that their weights
come from DRAM, as in a model too big for the cache). Also timed, for reference: torch's own int8/int4
weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), fbgemm's dynamic int8
Linear (per-tensor activations), and nf4 on the reference backend (dequantize, then matmul). nf4 on
lowbit's kernel reads the same 4-bit codes as w4g128 and looks each up in a 16-entry table.
Run: python benchmarks/linear_cpu.py [--quick]
"""

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.eval.latency import cold_copies, compare, cycling
from lowbit.eval.size import tensor_bytes

RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name: (config, forced backend or None)
    "w8 (lowbit)": (lowbit.WeightOnly(bits=8, group_size=None, symmetric=True), None),
    "w4g128 (lowbit)": (lowbit.WeightOnly(bits=4, group_size=128), None),
    "nf4g128 (lowbit)": (lowbit.WeightOnly(format="nf4", group_size=128), None),
    "w8a8 dynamic (lowbit)": (lowbit.Int8Dynamic(), None),
    "w8 (torch int8pack)": (lowbit.WeightOnly(bits=8, group_size=None, symmetric=True), "cpu_int8pack"),
    "w4g128 (torch int4pack)": (lowbit.WeightOnly(bits=4, group_size=128), "cpu_int4pack"),
    "nf4g128 (reference)": (lowbit.WeightOnly(format="nf4", group_size=128), "reference"),
}


def _quantized(lin: nn.Linear, config, backend):
    m = nn.Sequential(copy.deepcopy(lin))
    lowbit.quantize_(m, config)
    m[0].backend = backend
    return m[0]


def _fbgemm(lin: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = lin.weight.detach()
        scales = w.abs().amax(1) / 127
        qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, lin.bias)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed)


def _layers(rows: int, cols: int, slow_backends: bool) -> dict:
    """name -> (factory building an independent copy of the layer, bytes of its weights)."""
    torch.manual_seed(0)
    lin = nn.Linear(cols, rows, bias=False)
    layers = {
        "fp32": (lambda: copy.deepcopy(lin), 4 * rows * cols),
        "fbgemm dynamic int8": (lambda: _fbgemm(lin), rows * cols),
    }
    for name, (config, backend) in VARIANTS.items():
        if backend is not None and not slow_backends:
            continue
        q = _quantized(lin, config, backend)
        nbytes = tensor_bytes(dict(q.named_buffers()))
        layers[name] = (lambda c=config, b=backend: _quantized(lin, c, b), nbytes)
    return layers


def measure(rows: int, cols: int, batch: int, cold: bool, slow_backends: bool) -> dict:
    x = torch.randn(batch, cols)
    cands = {}
    for name, (factory, nbytes) in _layers(rows, cols, slow_backends and batch <= 4).items():
        copies = [factory() for _ in range(cold_copies(nbytes) if cold else 1)]
        cands[name] = cycling([(lambda m=m: m(x)) for m in copies])
    with torch.inference_mode():
        us = compare(cands, rounds=9 if batch >= 64 else 15)
    return {name: {"us": round(v, 1), "speedup": round(us["fp32"] / v, 2)} for name, v in us.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("ROWS", "COLS"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--quick", action="store_true", help="batch 1 only, no torch-kernel backends")
    args = p.parse_args()
    batches = [1] if args.quick else args.batches
    rows, cols = args.shape
    t0, results = time.perf_counter(), []
    for cold in (False, True):
        for b in batches:
            r = measure(rows, cols, b, cold, slow_backends=not args.quick)
            cache = "cold" if cold else "warm"
            results.append({"rows": rows, "cols": cols, "batch": b, "cache": cache, "us": r})
            print(json.dumps(results[-1]), flush=True)
    env = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "linear_cpu.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    (RESULTS / "linear_cpu.md").write_text(markdown(results, env))
    print(markdown(results, env))
    return 0


def markdown(results: list[dict], env: dict) -> str:
    names = list(dict.fromkeys(n for r in results for n in r["us"]))
    head = "| cache | batch | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names) + "\n"
    rows = []
    for r in results:
        us = r["us"]
        cells = [f"{us[n]['us']:.0f} us ({us[n]['speedup']:.2f}x)" if n in us else "-" for n in names]
        rows.append(f"| {r['cache']} | {r['batch']} | " + " | ".join(cells) + " |")
    shape = f"{results[0]['rows']}x{results[0]['cols']}"
    note = (
        f"One {shape} Linear, float32 activations; median microseconds per call and speedup vs float32 "
        "measured in the same interleaved rounds. warm: one layer called repeatedly (weights in cache); "
        "cold: copies cycled so weights stream from DRAM.\n\n"
    )
    return note + head + "\n".join(rows) + f"\n\n{json.dumps(env)}\n"


if __name__ == "__main__":
    sys.exit(main())
