"""Learned rounding for static quantization (``StaticW8A8(rounding=...)``): nearest, AdaRound, BRECQ.

    python benchmarks/learned_rounding.py                      # Fashion-MNIST CNN, W4A8 and W3A8, CPU
    python benchmarks/learned_rounding.py --model mobilenetv2 --bits 8 4 --device cuda

Fashion-MNIST CNN: accuracy on the 10,000 test images (lowbit's integer reference kernels). MobileNetV2:
top-1 agreement with fp32 on the 480 evaluation crops, run by ONNX Runtime from lowbit's export (with
``session.x64quantprecision`` on, so that CPUs without VNNI do not saturate u8 x s8 sums; the default
session gives 79.6% instead of 92.1% for the nearest-rounded W8A8 model on such a CPU). Calibration and
reconstruction data: 512 training images / photo crops. Results: ``benchmarks/results/learned_rounding.*``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.data.vision import fashion_mnist, photo_crops
from lowbit.workflows import calibration_batches

ROUNDINGS = ("nearest", "adaround", "brecq")
RESULTS = Path(__file__).parent / "results"


def fashion_task():
    x, y = fashion_mnist("test")

    def score(model) -> float:
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        return float((logits.argmax(1) == y).float().mean() * 100)

    return calibration_batches("fashion-mnist:512"), score


def photos_task(fp32: torch.nn.Module):
    import onnxruntime as ort

    from lowbit.export.onnx import export_onnx

    x = photo_crops("eval")
    tmp = Path(tempfile.mkdtemp())

    def outputs(model) -> np.ndarray:
        path = export_onnx(model, x[:1], tmp / "model.onnx", overwrite=True)
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.x64quantprecision", "1")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: x[i : i + 32].numpy()})[0] for i in range(0, len(x), 32)])

    ref = outputs(fp32).argmax(1)
    return calibration_batches("photos:512"), lambda m: float((outputs(m).argmax(1) == ref).mean() * 100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion-mnist-cnn", choices=["fashion-mnist-cnn", "mobilenetv2"])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--device", default=None, help="reconstruction device (e.g. cuda)")
    a = p.parse_args()
    model, _ = lowbit.models.load(a.model)
    model.eval()
    calib, score = fashion_task() if a.model == "fashion-mnist-cnn" else photos_task(model)
    rows = [{"variant": "fp32", "score": score(model)}]
    for bits in a.bits:
        for rounding in ROUNDINGS:
            q, t0 = copy.deepcopy(model), time.perf_counter()
            cfg = lowbit.StaticW8A8(
                weight_bits=bits, rounding=rounding, recon_steps=a.steps, recon_device=a.device
            )
            lowbit.quantize_(q, cfg, calib)
            rows.append(
                {"variant": f"w{bits}a8 {rounding}", "score": score(q), "seconds": time.perf_counter() - t0}
            )
            print(rows[-1], flush=True)
    env = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "steps": a.steps,
        "device": a.device or "cpu",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"learned_rounding_{a.model}.json").write_text(
        json.dumps({"rows": rows, "env": env}, indent=1)
    )
    metric = "accuracy" if a.model == "fashion-mnist-cnn" else "top-1 agreement (ORT)"
    lines = [f"| variant | {metric} | seconds |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['score']:.2f} | {r.get('seconds', 0):.0f} |" for r in rows]
    (RESULTS / f"learned_rounding_{a.model}.md").write_text("\n".join(lines) + f"\n\n{json.dumps(env)}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
