"""MobileNetV2 static int8 as TFLite (LiteRT's interpreter) against lowbit's ONNX QDQ export (ONNX Runtime).

For each activation observer (``--observers``, default mse and percentile), one lowbit ``StaticW8A8``
model (default options otherwise; calibrated on 512 photo crops, ``--calib photos:512``, as
benchmarks/static_ptq.py calibrates mobilenetv2) is exported twice: to ONNX QDQ (``lowbit.export.onnx``,
run by onnxruntime) and to TFLite (``lowbit.export.tflite``, run by ``ai_edge_litert``'s interpreter on
its default CPU path, XNNPACK). The float model is exported to both as fp32.

- Agreement: top-1 agreement with the fp32 PyTorch model on the 480 eval photo crops for each export
  (target: TFLite int8 within 0.5 point of the ONNX export's), the crops where only one of the two
  agrees, and agreement with lowbit's own int8 forward. The crops hold many near ties (rounding the
  float weights to bf16 flips 4% of them, benchmarks/results/static_ptq.md): one-code differences
  between runtimes move a few crops either way.
  The same TFLite file is also scored on TFLite's builtin kernels (no XNNPACK), which round twice
  when they requantize: how far kernel rounding alone moves the score.
- Latency: batch 1, int8 vs fp32 TFLite in the same interpreter (target: int8 faster), onnxruntime's
  two for context; 2 threads and 1 thread, the four files timed in interleaved rounds, median.
  ``--max-load`` waits for a quiet machine first; the load is recorded.

Writes benchmarks/results/tflite_litert.{json,md}. Run: make bench-tflite (or python this file).
"""

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import lowbit
from lowbit.data import vision
from lowbit.export.onnx import export_onnx
from lowbit.export.tflite import export_tflite
from lowbit.workflows import calibration_batches

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("onnx fp32", "onnx int8", "tflite fp32", "tflite int8")


class OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level, opts.intra_op_num_threads = 3, threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:  # NCHW
        return self.session.run(None, {"input": x})[0]


class LiteRunner:
    """LiteRT's interpreter on a .tflite file (NHWC input); resized when the batch size changes."""

    def __init__(self, path: Path, threads: int, resolver=OpResolverType.AUTO) -> None:
        self.it = Interpreter(
            model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver
        )
        self.inp, self.out = self.it.get_input_details()[0]["index"], self.it.get_output_details()[0]["index"]
        self.batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:  # NCHW, fed NHWC
        if x.shape[0] != self.batch:
            self.it.resize_tensor_input(self.inp, [x.shape[0], *x.shape[2:], x.shape[1]])
            self.it.allocate_tensors()
            self.batch = x.shape[0]
        self.it.set_tensor(self.inp, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        self.it.invoke()
        return self.it.get_tensor(self.out)


def runner(path: Path, threads: int):
    return LiteRunner(path, threads) if path.suffix == ".tflite" else OrtRunner(path, threads)


def outputs(path: Path, batches: list[np.ndarray]) -> np.ndarray:
    run = runner(path, 0 if path.suffix == ".onnx" else 2)
    return np.concatenate([run(b) for b in batches])


def latency_ms(paths: dict[str, Path], example: np.ndarray, threads: int, rounds: int, calls: int) -> dict:
    """Median milliseconds per batch-1 call, the variants interleaved round by round."""
    runs = {k: runner(p, threads) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            for _ in range(3):
                run(example)
            t0 = time.perf_counter()
            for _ in range(calls):
                run(example)
            times[k].append((time.perf_counter() - t0) / calls * 1e3)
    return {k: round(float(np.median(v)), 3) for k, v in times.items()}


def wait_for_quiet(max_load: float | None, minutes: float) -> None:
    """On a shared machine: wait until the 1-minute load average is below ``max_load`` (at most
    ``minutes``) before timing; the load is recorded either way."""
    end = time.monotonic() + 60 * minutes
    while max_load is not None and os.getloadavg()[0] >= max_load and time.monotonic() < end:
        time.sleep(10)


def agreement(pred: np.ndarray, ref: np.ndarray) -> float:
    return round(float(100 * (pred == ref).mean()), 2)


def predictions(path: Path, batches: list[np.ndarray]) -> np.ndarray:
    return outputs(path, batches).argmax(1)


def int8_row(model, observer: str, calib: list, batches: list, fp32_pred: np.ndarray, tmp: Path):
    """One ``StaticW8A8(observer=...)`` model, exported to ONNX and TFLite: (scores, {variant: path})."""
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    summary = lowbit.quantize_(q, lowbit.StaticW8A8(observer=observer), calib)
    calib_s = time.perf_counter() - t0
    with torch.no_grad():
        ours = np.concatenate([q(torch.from_numpy(b)).argmax(1).numpy() for b in batches])
    paths = {
        "onnx int8": export_onnx(q, calib[0][:1], tmp / f"int8-{observer}.onnx"),
        "tflite int8": Path(export_tflite(q, tmp / f"int8-{observer}.tflite")["out"]),
    }
    pred = {k: predictions(p, batches) for k, p in paths.items()}
    right = {k: v == fp32_pred for k, v in pred.items()}
    row = {
        "calib_seconds": round(calib_s, 1),
        "quantized": len(summary.quantized),
        "lowbit int8 (PyTorch)": agreement(ours, fp32_pred),
    }
    for k, p in paths.items():
        row[k] = {
            "top1_agreement_fp32": agreement(pred[k], fp32_pred),
            "agreement_lowbit_int8": agreement(pred[k], ours),
            "bytes": p.stat().st_size,
        }
    row["onnx_vs_tflite"] = {
        "same_top1": agreement(pred["onnx int8"], pred["tflite int8"]),
        "only_onnx_agrees_with_fp32": int((right["onnx int8"] & ~right["tflite int8"]).sum()),
        "only_tflite_agrees_with_fp32": int((right["tflite int8"] & ~right["onnx int8"]).sum()),
    }
    row["tflite_minus_onnx_points"] = round(
        row["tflite int8"]["top1_agreement_fp32"] - row["onnx int8"]["top1_agreement_fp32"], 2
    )
    # the same file on TFLite's builtin kernels (no XNNPACK; they requantize rounding twice): how far
    # the kernels' rounding alone moves the score
    builtin = LiteRunner(paths["tflite int8"], 2, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    other = np.concatenate([builtin(b) for b in batches]).argmax(1)
    row["tflite int8, builtin kernels"] = {
        "top1_agreement_fp32": agreement(other, fp32_pred),
        "agreement_lowbit_int8": agreement(other, ours),
    }
    return row, paths


def bench(args, tmp: Path) -> dict:
    model, _ = lowbit.models.load("mobilenetv2")
    crops = vision.photo_crops("eval", 64 if args.quick else None)
    batches = [b.numpy() for b in crops.split(32)]
    with torch.no_grad():
        fp32_pred = torch.cat([model(b) for b in crops.split(32)]).argmax(1).numpy()
    calib = calibration_batches(args.calib)
    paths = {
        "onnx fp32": export_onnx(model, calib[0][:1], tmp / "fp32.onnx"),
        "tflite fp32": Path(export_tflite(model, tmp / "fp32.tflite")["out"]),
    }
    fp32 = {
        k: {"top1_agreement_fp32": agreement(predictions(p, batches), fp32_pred), "bytes": p.stat().st_size}
        for k, p in paths.items()
    }
    rows = {}
    for observer in args.observers:
        rows[observer], int8_paths = int8_row(model, observer, calib, batches, fp32_pred, tmp)
        if observer == args.observers[0]:
            paths |= int8_paths  # the int8 files timed (every observer gives the same graph)
    wait_for_quiet(args.max_load, args.wait_minutes)
    load = {"before": os.getloadavg()[0]}
    lat = {f"{t} threads": latency_ms(paths, batches[0][:1], t, args.rounds, args.calls) for t in (2, 1)}
    load["after"] = os.getloadavg()[0]
    targets = {
        f"tflite_int8_within_0.5_of_onnx_int8 ({o})": r["tflite_minus_onnx_points"] >= -0.5
        for o, r in rows.items()
    }
    targets["tflite_int8_faster_than_fp32"] = all(v["tflite int8"] < v["tflite fp32"] for v in lat.values())
    return {
        "model": "mobilenetv2",
        "calib": args.calib,
        "n_eval": len(crops),
        "fp32": fp32,
        "int8": rows,
        "timed_observer": args.observers[0],
        "latency_ms": lat,
        "load_1min": load,
        "targets": targets,
    }


def markdown(r: dict, env: dict) -> str:
    lines = [
        f"# {__doc__.splitlines()[0]}",
        "",
        "`make bench-tflite` (`python benchmarks/tflite_litert.py`).",
        "",
        f"MobileNetV2, `StaticW8A8(observer=...)` calibrated on `{r['calib']}`, {r['n_eval']} eval photo "
        "crops; top-1 agreement (%) with the fp32 PyTorch model. fp32 exports: "
        + ", ".join(f"{k} {v['top1_agreement_fp32']:.2f}" for k, v in r["fp32"].items())
        + ".",
        "",
        "| observer | lowbit int8 (PyTorch) | ONNX int8 (ORT) | TFLite int8 (LiteRT) | TFLite - ONNX "
        "| ONNX/TFLite same top-1 | only ONNX / only TFLite agree | TFLite builtin kernels "
        "| vs lowbit int8: ONNX, TFLite, builtin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for obs, row in r["int8"].items():
        o, t, d = row["onnx int8"], row["tflite int8"], row["onnx_vs_tflite"]
        b = row["tflite int8, builtin kernels"]
        lines.append(
            f"| {obs} | {row['lowbit int8 (PyTorch)']:.2f} | {o['top1_agreement_fp32']:.2f} | "
            f"{t['top1_agreement_fp32']:.2f} | {row['tflite_minus_onnx_points']:+.2f} | "
            f"{d['same_top1']:.2f} | {d['only_onnx_agrees_with_fp32']} / "
            f"{d['only_tflite_agrees_with_fp32']} | {b['top1_agreement_fp32']:.2f} | "
            f"{o['agreement_lowbit_int8']:.2f}, {t['agreement_lowbit_int8']:.2f}, "
            f"{b['agreement_lowbit_int8']:.2f} |"
        )
    sizes = {k: v["bytes"] / 1e6 for k, v in r["fp32"].items()}
    first = r["int8"][r["timed_observer"]]
    sizes |= {k: first[k]["bytes"] / 1e6 for k in ("onnx int8", "tflite int8")}
    lines += [
        "",
        "Size (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()) + ".",
        "",
        f"Latency, batch 1, median of interleaved rounds (ms; int8: the {r['timed_observer']} model). "
        "Load (1-minute average) before / after timing: "
        f"{r['load_1min']['before']:.2f} / {r['load_1min']['after']:.2f}.",
        "",
        "| threads | TFLite fp32 | TFLite int8 | int8 speed-up | ORT fp32 | ORT int8 | int8 speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t, v in r["latency_ms"].items():
        tfl = v["tflite fp32"] / v["tflite int8"]
        onx = v["onnx fp32"] / v["onnx int8"]
        lines.append(
            f"| {t.split()[0]} | {v['tflite fp32']:.2f} | {v['tflite int8']:.2f} | {tfl:.2f}x | "
            f"{v['onnx fp32']:.2f} | {v['onnx int8']:.2f} | {onx:.2f}x |"
        )
    lines += ["", f"Targets: {json.dumps(r['targets'])}", "", json.dumps(env), ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", default="photos:512", help="calibration data (default photos:512)")
    p.add_argument(
        "--observers",
        nargs="+",
        default=["mse", "percentile"],
        help="StaticW8A8 activation observers, one int8 model each (the first is timed)",
    )
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds per thread count")
    p.add_argument("--calls", type=int, default=20, help="timed calls per variant and round")
    p.add_argument("--max-load", type=float, help="wait until the 1-minute load is below this to time")
    p.add_argument("--wait-minutes", type=float, default=60, help="longest wait for --max-load")
    p.add_argument("--quick", action="store_true", help="64 calibration and eval crops (a smoke run)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    if args.quick:
        args.calib, args.rounds, args.calls = "photos:64", 3, 5
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args, Path(tmp))
    env = {
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ai_edge_litert": version("ai-edge-litert"),
        "flatbuffers": version("flatbuffers"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - t0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "tflite_litert_quick" if args.quick else "tflite_litert"
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "result": result}, indent=1))
    (out / f"{stem}.md").write_text(markdown(result, env))
    print(markdown(result, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
