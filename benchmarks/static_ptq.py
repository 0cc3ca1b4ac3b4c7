"""Static W8A8 PTQ, lowbit vs ONNX Runtime's own quantizer, on the same models and calibration set.

For each model: lowbit's ``StaticW8A8`` (several observers) and ``onnxruntime.quantization.quantize_static``
(QDQ, uint8 activations, int8 weights; per-tensor, its default, and per-channel) calibrate on the same
512 samples; every int8 model runs in ONNX Runtime (lowbit's through ``export_onnx``) and is scored
against the fp32 model run the same way (``EXTRA`` adds lowbit rows with other options, ``BF16_REFERENCE``
a row that is not quantized: the fp32 model with its weights rounded to bf16, a yardstick for how many
of the eval crops a tiny perturbation flips):

| model             | calibration (512)         | metric                                                  |
|-------------------|---------------------------|---------------------------------------------------------|
| mnist-cnn         | MNIST train images        | test accuracy (10,000 images)                           |
| fashion-mnist-cnn | Fashion-MNIST train       | test accuracy (10,000 images)                           |
| mobilenetv2       | photo crops, calib photos | top-1 agreement with fp32 on the eval photos' crops     |
| minilm-l6         | Lee corpus, calib part    | embedding cosine to fp32 (eval sentences), WordSim-353 |

Latency: ONNX Runtime, batch 1, fp32 vs int8 models timed in interleaved rounds (median), with ONNX
Runtime's default threads (one per core) and again with one thread (the int8/fp32 ratio depends on it:
int8 kernels gain less from the second core). Calibration
time: wall seconds of ``quantize_`` (lowbit) and ``quantize_static`` (ONNX Runtime) for 512 samples.
Writes benchmarks/results/static_ptq.{json,md}. Run: make bench-static (or python this file).
"""

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime import quantization as oq

import lowbit
from lowbit.export.onnx import export_onnx
from lowbit.workflows import calibration_batches

RESULTS = Path(__file__).parent / "results"
MODELS = ("mnist-cnn", "fashion-mnist-cnn", "mobilenetv2", "minilm-l6")
CALIB = {"mnist-cnn": "mnist", "fashion-mnist-cnn": "fashion-mnist", "mobilenetv2": "photos",
         "minilm-l6": "sentences"}  # fmt: skip
OBSERVERS = ("minmax", "percentile", "kl", "mse")
ORT_VARIANTS = {"ort per-tensor minmax": (False, "MinMax"), "ort per-channel minmax": (True, "MinMax"),
                "ort per-channel entropy": (True, "Entropy")}  # fmt: skip
# ONNX Runtime's histogram calibration keeps every intermediate output of every batch in memory: 512
# MobileNetV2 crops need more than this machine's 24 GiB (OOM-killed), so that variant gets fewer.
ENTROPY_SAMPLES = {"mobilenetv2": 128}
# Extra lowbit rows: (label, observer, exclude patterns, other StaticW8A8 options). MobileNetV2's stem conv
# (3 -> 32 channels, 864 weights) reads the image itself: its most sensitive layer. Kept float, it costs a
# QuantizeLinear and a layout reorder after it (its int8 form, padded to 4 channels, is as fast as fp32).
EXTRA = {
    "mobilenetv2": [
        ("lowbit percentile, stem conv float", "percentile", ("features.0.0",), {}),
        ("lowbit percentile, no ReLU6 stretch", "percentile", (), {"stretch_relu6": False}),
    ]
}
# Reference rows, no quantization: how far a small perturbation alone moves the score. MobileNetV2's
# eval crops hold many near ties (cat breeds, cup vs espresso): weights rounded to bf16 (8 significant
# bits, relative error <= 2**-9) already flip some of them.
BF16_REFERENCE = ("mobilenetv2",)


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """ONNX Runtime CPU session; ``threads`` intra-op threads (0: ONNX Runtime's default, one per core)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input": batch.numpy()}
    return {k: v.numpy() for k, v in batch.items()}


class Reader(oq.CalibrationDataReader):
    def __init__(self, batches, names):
        self.items = iter([{k: v for k, v in feeds(b).items() if k in names} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(fp32: Path, out: Path, batches, per_channel: bool, method: str) -> float:
    """ONNX Runtime's recipe: pre-process (shape inference, optimization), then quantize_static (QDQ)."""
    pre = out.with_suffix(".pre.onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oq.quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        names = {i.name for i in session(pre).get_inputs()}
        oq.quantize_static(
            str(pre), str(out), Reader(batches, names), quant_format=oq.QuantFormat.QDQ,
            activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8, per_channel=per_channel,
            calibrate_method=getattr(oq.CalibrationMethod, method),
            # MinMax: reduce every 5 batches (memory); a multiple of the batch count ends on an empty list,
            # which ONNX Runtime 1.32 rejects ("No data is collected")
            extra_options={"CalibMaxIntermediateOutputs": 5},
        )  # fmt: skip
    return time.perf_counter() - t0


def bf16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every Conv2d/Linear weight rounded to bfloat16 (stored as float32)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    return out


def run_outputs(path: Path, inputs: list) -> np.ndarray:
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    return np.concatenate([s.run(None, {k: v for k, v in feeds(b).items() if k in names})[0] for b in inputs])


def latency_us(
    paths: dict[str, Path], example, rounds: int, calls: int, threads: int = 0
) -> dict[str, float]:
    """Median microseconds per batch-1 call, variants interleaved round by round."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    inputs = {k: {n: v for n, v in feeds(example).items() if n in {i.name for i in s.get_inputs()}}
              for k, s in sessions.items()}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(5):
                s.run(None, inputs[k])
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, inputs[k])
            times[k].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: float(np.median(v)) for k, v in times.items()}


class Task:
    """Evaluation inputs and the score of a model's outputs against fp32's."""

    def __init__(self, name: str, tokenizer, quick: bool):
        from lowbit.data import vision

        self.name, self.tok = name, tokenizer
        if name == "mobilenetv2":
            crops = vision.photo_crops("eval", 64 if quick else None)
            self.inputs, self.labels = list(crops.split(32)), None
        elif name == "minilm-l6":
            from lowbit.data.text_pairs import sentences, wordsim353

            self.pairs = wordsim353()
            words = sorted({w for a, b, _ in self.pairs for w in (a, b)})
            texts = sentences("eval", 64 if quick else None)
            self.n_sent, self.words = len(texts), words
            self.inputs = [self._tokens(texts[i : i + 64]) for i in range(0, len(texts), 64)]
            self.inputs += [self._tokens(words[i : i + 256]) for i in range(0, len(words), 256)]
        else:
            images, labels = (vision.mnist if name == "mnist-cnn" else vision.fashion_mnist)("test")
            n = 1000 if quick else len(labels)
            self.inputs, self.labels = list(images[:n].split(500)), labels[:n].numpy()

    def _tokens(self, texts):
        return dict(
            self.tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        )

    def embeddings(self, outputs: np.ndarray) -> np.ndarray:
        mask = np.concatenate([b["attention_mask"].numpy() for b in self.inputs]).astype(np.float32)
        e = (outputs * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def score(self, outputs: np.ndarray, ref: np.ndarray) -> dict:
        if self.name == "minilm-l6":
            from scipy.stats import spearmanr

            e, r = self.embeddings(outputs), self.embeddings(ref)
            cos = (e * r).sum(1)[: self.n_sent]
            idx = {w: self.n_sent + i for i, w in enumerate(self.words)}
            sims = [float(e[idx[a]] @ e[idx[b]]) for a, b, _ in self.pairs]
            rho = spearmanr(sims, [s for _, _, s in self.pairs]).statistic
            return {
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "wordsim_rho": float(rho),
            }
        pred, ref_pred = outputs.argmax(1), ref.argmax(1)
        if self.labels is None:
            return {"top1_agreement": float(100 * (pred == ref_pred).mean()), "n": int(len(pred))}
        return {"accuracy": float(100 * (pred == self.labels).mean()), "n": int(len(pred))}


def bench_model(name: str, observers, quick: bool, tmp: Path, equalize: bool = False) -> dict:
    model, tok = lowbit.models.load(name)
    batches = calibration_batches(f"{CALIB[name]}:{64 if quick else 512}", tok)
    task = Task(name, tok, quick)
    example = {k: v[:1] for k, v in batches[0].items()} if isinstance(batches[0], dict) else batches[0][:1]
    paths = {"fp32": export_onnx(model, example, tmp / f"{name}-fp32.onnx")}
    calib_s, summaries = {}, {}
    if name in BF16_REFERENCE:
        label = "fp32, weights rounded to bf16"
        paths[label] = export_onnx(bf16_weights(model), example, tmp / f"{name}-bf16w.onnx")
    runs = [(f"lowbit {obs}", obs, (), {}) for obs in observers]
    runs += [r for r in EXTRA.get(name, ()) if r[1] in observers]
    for i, (label, obs, exclude, options) in enumerate(runs):
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        cfg = lowbit.StaticW8A8(observer=obs, equalize=equalize, **options)
        summary = lowbit.quantize_(q, cfg, batches, exclude=exclude)
        calib_s[label] = time.perf_counter() - t0
        summaries[label] = {
            "quantized": len(summary.quantized),
            "float_ops": summary.float_ops,
            "stretched": len(summary.stretched),
        }
        paths[label] = export_onnx(q, example, tmp / f"{name}-lowbit-{i}.onnx")
    failed = {}
    for label, (per_channel, method) in ORT_VARIANTS.items():
        use = batches
        if method == "Entropy" and name in ENTROPY_SAMPLES and not quick:
            use = batches[: ENTROPY_SAMPLES[name] // len(batches[0])]
            label = f"{label} ({ENTROPY_SAMPLES[name]} samples)"
        out = tmp / f"{name}-{label.replace(' ', '-').replace('(', '').replace(')', '')}.onnx"
        try:
            calib_s[label] = ort_quantize(paths["fp32"], out, use, per_channel, method)
            paths[label] = out
        except Exception as e:  # a peer's failure is a result to report, not a crash
            failed[label] = f"{type(e).__name__}: {e}"
    ref = run_outputs(paths["fp32"], task.inputs)
    scores = {k: task.score(run_outputs(p, task.inputs), ref) for k, p in paths.items()}
    lat = latency_us(paths, example, rounds=3 if quick else 15, calls=10 if quick else 20)
    lat1 = latency_us(paths, example, rounds=3 if quick else 9, calls=10 if quick else 20, threads=1)
    return {"model": name, "calib_samples": sum(len(b["input_ids"]) if isinstance(b, dict) else len(b)
                                                for b in batches),  # fmt: skip
            "scores": scores, "latency_us": lat, "latency_us_1thread": lat1, "calib_seconds": calib_s,
            "lowbit": summaries,
            "onnx_bytes": {k: p.stat().st_size for k, p in paths.items()}, "failed": failed}  # fmt: skip


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        metrics = list(next(iter(r["scores"].values())))
        head = "| variant | " + " | ".join(metrics) + " | ORT latency (us) | vs fp32 "
        head += "| 1 thread (us) | vs fp32 | calibration (s) | MB |"
        lines += [f"### {r['model']} ({r['calib_samples']} calibration samples)", "", head,
                  "|---|" + "---:|" * (len(metrics) + 6)]  # fmt: skip
        base, lat1 = r["latency_us"]["fp32"], r.get("latency_us_1thread", {})
        for k, sc in r["scores"].items():
            vals = " | ".join(f"{v:.4f}" if isinstance(v, float) and abs(v) < 2 else f"{v:.2f}"
                              if isinstance(v, float) else str(v) for v in sc.values())  # fmt: skip
            lat = r["latency_us"][k]
            cal = r["calib_seconds"].get(k)
            cal_s = "-" if cal is None else f"{cal:.1f}"
            mb = r["onnx_bytes"][k] / 1e6
            one = f"{lat1[k]:.0f} | {lat1['fp32'] / lat1[k]:.2f}x" if k in lat1 else "- | -"
            lines.append(f"| {k} | {vals} | {lat:.0f} | {base / lat:.2f}x | {one} | {cal_s} | {mb:.1f} |")
        lines += [f"| {k} | failed: {err[:100]} |" for k, err in r["failed"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    p.add_argument("--quick", action="store_true", help="small slices (a smoke run, not a result)")
    p.add_argument("--equalize", action="store_true", help="StaticW8A8(equalize=True)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for m in args.models:
            results.append(bench_model(m, args.observers, args.quick, Path(tmp), args.equalize))
            print(markdown(results[-1:]), flush=True)
    env = {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": sys.version.split()[0],
           "machine": platform.machine(), "threads": torch.get_num_threads(), "quick": args.quick,
           "equalize": args.equalize,
           "seconds": round(time.perf_counter() - t0)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "static_ptq_quick" if args.quick else "static_ptq"
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(
        f"{__doc__.split(chr(10))[0]}\n\n{markdown(results)}\n{json.dumps(env)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
