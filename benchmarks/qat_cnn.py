"""Quantization-aware training of the bundled CNNs, side by side with post-training quantization of the same
model and with torchao's QAT.

For each row (model, scheme, target): the fp32 model's test accuracy; PTQ, the same ``lowbit.qat`` layers
at step 0 (activation ranges from the percentile observer on 2,048 training images, weight scales by the
MSE search) converted without training; QAT, the same start trained (the row's steps, batch 128, AdamW,
peak lr ``--lr``, cosine schedule, BatchNorm statistics frozen after 80% of the steps, cross-entropy on the
training labels plus distillation from the fp32 model, as ``lowbit quantize --method qat`` does) and
converted. Every lowbit accuracy is measured on the deployed, converted model
(integer-only ``QStaticConv2d``/``QStaticLinear`` layers) over the full 10,000-image test split.

torchao (``--peer``, in the benchmark environment, ``make bench-qat``): ``torchao.quantization.qat``
fake-quantizes ``nn.Linear`` (and embeddings) only: on this CNN its ``QATConfig`` with 4-bit per-channel
weights and 4-bit activations (per token, ranges taken from each row at run time: torchao has no static
per-tensor option) reaches the classifier alone, the six convs train in fp32; it is
trained with the same loop, steps and learning rate, and its accuracy is that of the fake-quantized model
(torchao has no converted form for 4-bit static activations).

Writes benchmarks/results/qat_cnn.{json,md}. Run: make bench-qat (or python this file).
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit import models, qat
from lowbit.data import vision
from lowbit.eval.accuracy import accuracy
from lowbit.training import FREEZE_BN_AT, INIT_IMAGES

RESULTS = Path(__file__).parent / "results"
OBJECTIVE = qat.Objective(task_weight=1.0, distill_weight=1.0)  # what `lowbit quantize --method qat` runs
# (model, scheme, target: most points below fp32 the QAT row may be, training steps)
ROWS = (
    ("fashion-mnist-cnn", "w4a4", 0.5, 2000),
    ("fashion-mnist-cnn", "wta8", 1.5, 2000),
    ("fashion-mnist-cnn", "w1a8", 3.0, 2000),
    ("mnist-cnn", "w2a2", 0.5, 4000),
)
DATA = {"fashion-mnist-cnn": vision.fashion_mnist, "mnist-cnn": vision.mnist}


def prepared(name: str, scheme: str, images: torch.Tensor) -> torch.nn.Module:
    model = models.load(name, progress=False)[0]
    qat.prepare(model, qat.parse_qat_scheme(scheme), list(images[:INIT_IMAGES].split(256)))
    return model


def deployed_accuracy(model: torch.nn.Module, test: tuple) -> float:
    qat.convert(model)
    return round(accuracy(model, *test), 2)


def bench_row(name: str, scheme: str, target: float, steps: int, lr: float) -> dict:
    train, test = DATA[name]("train"), DATA[name]("test")
    teacher = models.load(name, progress=False)[0]
    fp32 = round(accuracy(teacher, *test), 2)
    torch.manual_seed(0)
    ptq = deployed_accuracy(prepared(name, scheme, train[0]), test)
    model = prepared(name, scheme, train[0])
    opts = qat.TrainOptions(steps=steps, lr=lr, freeze_bn_after=int(FREEZE_BN_AT * steps))
    t0 = time.perf_counter()
    qat.train(model, qat.shuffled(*train, batch_size=128), opts, teacher=teacher, objective=OBJECTIVE)
    seconds = round(time.perf_counter() - t0, 1)
    trained = deployed_accuracy(model, test)
    row = {"model": name, "scheme": scheme, "fp32": fp32, "ptq": ptq, "qat": trained, "target_drop": target}
    row |= {"qat_drop": round(fp32 - trained, 2), "met": fp32 - trained <= target, "steps": steps}
    row["train_seconds"] = seconds
    print(json.dumps(row), flush=True)
    return row


def torchao_row(name: str, steps: int, lr: float) -> dict:
    """torchao QATConfig (int4 per-channel weights, int4 per-token dynamic activations) on the same model."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    train, test = DATA[name]("train"), DATA[name]("test")
    model = models.load(name, progress=False)[0]
    act = IntxFakeQuantizeConfig(torch.int4, "per_token", is_symmetric=False)  # no per-tensor option
    weight = IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    fake = [f for f, m in model.named_modules() if "FakeQuantized" in type(m).__name__]
    start = round(accuracy(model, *test), 2)
    t0 = time.perf_counter()
    plain_train(model, train, steps, lr)
    row = {"model": name, "scheme": "w4a4", "peer": "torchao", "fake_quantized_layers": fake}
    row |= {"step0": start, "qat": round(accuracy(model, *test), 2)}
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def plain_train(model: torch.nn.Module, train: tuple, steps: int, lr: float) -> None:
    """The loop ``lowbit.qat.train`` runs (AdamW, 2% warm-up then cosine, batch 128, same batches)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = int(0.02 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))),
    )
    batches = qat.shuffled(*train, batch_size=128).iter_from(0)
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def markdown(result: dict) -> str:
    lines = [
        f"# QAT of the bundled CNNs (lr {result['lr']}, steps per row)",
        "",
        f"`{result['command']}` on {result['machine']}, torch {result['torch']}.",
        "Accuracy (%) of the deployed (converted, integer-only) model on the 10,000 test images;",
        "PTQ = the same layers at step 0, converted without training; drop = fp32 - QAT in points. train s:",
        "wall seconds on the shared 2-core machine, not a speed result (a row that ran beside another job",
        "took longer).",
        "",
        "| model | scheme | fp32 | PTQ | QAT | drop | target | met | steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['scheme']} | {r['fp32']:.2f} | {r['ptq']:.2f} | {r['qat']:.2f} | "
            f"{r['qat_drop']:.2f} | <= {r['target_drop']} | {'yes' if r['met'] else 'no'} | "
            f"{r['steps']} | {r['train_seconds']} |"
        )
    for r in result.get("peers", []):
        lines += ["", f"torchao QAT, {r['model']} {r['scheme']}: fake-quantized layers",
                  f"{r['fake_quantized_layers']} (convs stay fp32); step 0 {r['step0']:.2f}%,",
                  f"after training {r['qat']:.2f}% "
                  f"(fake-quantized model), {r['train_seconds']} s."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="training steps of every row (default: each row's own)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", nargs="+", help="model:scheme pairs to run (default: all)")
    p.add_argument("--peer", action="store_true", help="add torchao's QAT (benchmark environment)")
    p.add_argument("--table", action="store_true", help="rewrite the markdown from the JSON only")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    out = Path(args.out)
    if args.table:
        result = json.loads((out / "qat_cnn.json").read_text())
        (out / "qat_cnn.md").write_text(markdown(result))
        return 0
    rows = [r for r in ROWS if not args.rows or f"{r[0]}:{r[1]}" in args.rows]
    result = {"command": "python " + " ".join(["benchmarks/qat_cnn.py", *sys.argv[1:]])}
    result |= {
        "lr": args.lr,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    result |= {"threads": torch.get_num_threads()}
    result["rows"] = [bench_row(n, s, target, args.steps or steps, args.lr) for n, s, target, steps in rows]
    if args.peer:
        result["peers"] = [torchao_row("fashion-mnist-cnn", args.steps or 2000, args.lr)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_cnn.json").write_text(json.dumps(result, indent=1))
    (out / "qat_cnn.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
