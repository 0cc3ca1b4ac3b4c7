"""Classification accuracy: top-1 predictions, accuracy against labels, agreement with a reference model.

All three run the model batch by batch under ``torch.no_grad()`` in eval mode (the model's own mode is
restored afterwards) and move each batch to the model's device; results live on the CPU.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lowbit.core.errors import LowbitError


def _check_images(images: Tensor, batch_size: int) -> None:
    if not isinstance(images, Tensor) or images.ndim < 2:
        raise LowbitError(f"images must be a tensor (N, ...) with N >= 1, got {_describe(images)}")
    if len(images) == 0:
        raise LowbitError("images is empty (N = 0): nothing to evaluate")
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}")


def _check_targets(name: str, targets: Tensor, n: int) -> None:
    if not isinstance(targets, Tensor) or targets.ndim != 1:
        raise LowbitError(f"{name} must be a 1-D tensor of class ids, got {_describe(targets)}")
    if len(targets) != n:
        raise LowbitError(f"{name} has {len(targets)} entries but there are {n} images")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Top-1 class ids of ``model`` on ``images`` (N, ...) -> int64 (N,) on the CPU.

    The model must return logits (B, num_classes) for a batch (B, ...).
    """
    _check_images(images, batch_size)
    device, was_training = _device(model), model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                logits = model(images[start : start + batch_size].to(device))
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    raise LowbitError(f"model must return logits (batch, classes), got {_describe(logits)}")
                out.append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Percent (0-100) of ``images`` (N, ...) whose top-1 prediction equals ``labels`` (N,)."""
    _check_images(images, batch_size)
    _check_targets("labels", labels, len(images))
    return _percent_equal(predict(model, images, batch_size), labels)


def agreement(
    model: nn.Module, reference_predictions: Tensor, images: Tensor, batch_size: int = 256
) -> float:
    """Percent (0-100) of ``images`` (N, ...) where ``model``'s top-1 equals ``reference_predictions`` (N,).

    ``reference_predictions``: e.g. ``predict(fp32_model, images)``.
    """
    _check_images(images, batch_size)
    _check_targets("reference_predictions", reference_predictions, len(images))
    return _percent_equal(predict(model, images, batch_size), reference_predictions)


def _percent_equal(predictions: Tensor, targets: Tensor) -> float:
    return (predictions == targets.cpu().long()).double().mean().item() * 100.0
