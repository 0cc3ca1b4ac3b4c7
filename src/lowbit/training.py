"""The quantization-aware training job behind ``lowbit quantize --method qat``: load, prepare, train,
convert, save.

Training data comes from ``--calib SOURCE:N``: ``mnist`` / ``fashion-mnist`` (the first N training
images with their labels: cross-entropy plus distillation from the float model, which stays loaded as the
teacher) or ``photos`` (N unlabelled crops: distillation alone). The initial activation ranges are
observed on the first ``INIT_IMAGES`` of them. Training checkpoints go to a hidden folder beside the output
(``.<out name>.qat``); running the same command again after an interruption resumes from the last one,
and the folder is removed once the model is saved.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.export.checkpoint import save
from lowbit.qat import Objective, QATConfig, TrainOptions, convert, prepare, shuffled, train

INIT_IMAGES = 2048
FREEZE_BN_AT = 0.8  # fraction of the steps after which BatchNorm statistics freeze


def training_set(source: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` of ``--calib SOURCE:N`` (module docstring)."""
    from lowbit.data import vision

    if source == "photos":
        return vision.photo_crops("calib", n), None
    if source in vision.DATASETS:
        images, labels = vision.DATASETS[source]("train")
        return images[:n], labels[:n]
    raise LowbitError(f"--method qat trains vision models on photos, mnist or fashion-mnist; got {source}")


def checkpoint_folder(out: Path) -> Path:
    """Where a QAT run writing ``out`` keeps its training checkpoint."""
    return out.parent / f".{out.name}.qat"


def check_trainable(model: nn.Module, tokenizer, ref: str) -> None:
    """``LowbitError`` unless ``model`` is a float vision model."""
    if tokenizer is not None or getattr(model, "lowbit_config", None) is not None:
        raise LowbitError(
            f"--method qat trains float vision models (mnist-cnn, fashion-mnist-cnn, mobilenetv2) on images; "
            f"{ref} is a language model or an already quantized checkpoint (a float language model trains "
            "block by block with --calib wiki:NxL and a weight-only scheme such as w3g64)"
        )


def train_and_save(
    model: nn.Module,
    config: QATConfig,
    out: Path,
    data: tuple[torch.Tensor, torch.Tensor | None],
    options: TrainOptions,
    *,
    batch_size: int = 128,
    selection: tuple = ((), ()),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train float ``model`` with ``config`` on ``data`` (``training_set``), convert and save it to
    ``out`` (checked by ``check_target``); returns stats. ``selection``: include/exclude patterns."""
    images, labels = data
    teacher = copy.deepcopy(model).eval()
    include, exclude = selection
    summary = prepare(model, config, list(images[:INIT_IMAGES].split(256)), include=include, exclude=exclude)
    if options.freeze_bn_after is None:
        options = replace(options, freeze_bn_after=int(FREEZE_BN_AT * options.steps))
    data = shuffled(*((images,) if labels is None else (images, labels)), batch_size=batch_size)
    folder = checkpoint_folder(out)
    t0 = time.perf_counter()
    objective = Objective(task_weight=0.0 if labels is None else 1.0, distill_weight=1.0)
    result = train(
        model, data, options, teacher=teacher, objective=objective, checkpoint=folder, progress=progress
    )
    convert(model)
    save(model, out, overwrite=overwrite)
    shutil.rmtree(folder, ignore_errors=True)
    from lowbit.eval.size import dir_bytes

    return {
        "objective": ("cross-entropy (labels) + " if labels is not None else "")
        + "distillation from the float model",
        "quantized_modules": len(summary.quantized),
        "kept_float": summary.skipped,
        "folded_batchnorm": len(summary.folded),
        "steps": options.steps,
        "resumed_from_step": result.resumed_from,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "bytes_on_disk": dir_bytes(out / "model.safetensors"),
    }
