"""Calibration: run batches through a float model while observers watch chosen layers.

``observing(model, observers)`` attaches forward hooks for as long as its ``with`` block lasts (they are
removed on exit, errors included). ``run_batches`` feeds the batches: a tensor is passed as
``model(batch)``, a mapping as ``model(**batch)`` (tokenizer output), a tuple or list as ``model(*batch)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.errors import LowbitError


@contextlib.contextmanager
def observing(model: nn.Module, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Iterator[None]:
    """Forward hooks for the ``with`` block: ``inputs[fqn].update(x)`` with each call's first input of
    module ``fqn``, ``outputs[fqn].update(y)`` with its output. Removed on exit, errors included."""
    handles = []

    def seen_input(obs):
        return lambda module, args, output: obs.update(args[0].detach()) if args else None

    def seen_output(obs):
        return lambda module, args, output: obs.update(output.detach())

    try:
        for fqn, obs in inputs.items():
            handles.append(model.get_submodule(fqn).register_forward_hook(seen_input(obs)))
        for fqn, obs in outputs.items():
            handles.append(model.get_submodule(fqn).register_forward_hook(seen_output(obs)))
        yield
    finally:
        for h in handles:
            h.remove()


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype)[6:]}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _call(model: nn.Module, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise LowbitError(f"calibration batches must be tensors, mappings or tuples, got {type(batch).__name__}")


def input_spec(batch) -> dict:
    """``{name: {"shape": [...], "dtype": "float32"}}`` of one batch: ``input`` for a tensor, the keys of a
    mapping, ``input0``, ``input1``... for a tuple (what ``export_onnx`` needs to rebuild an example)."""
    if isinstance(batch, torch.Tensor):
        items = {"input": batch}
    elif isinstance(batch, Mapping):
        items = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    else:
        items = {f"input{i}": v for i, v in enumerate(batch) if isinstance(v, torch.Tensor)}
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]} for k, v in items.items()}


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable, progress: bool = False) -> tuple[int, dict]:
    """Run every batch through ``model`` in eval mode (mode restored); returns how many ran and the
    ``input_spec`` of the first.

    Raises ``LowbitError`` for an empty iterable, and for a batch the model rejects, naming the batch's
    index, shape and dtype.
    """
    if batches is None:
        raise LowbitError("this config needs calibration data: pass calib=batches")
    was_training = model.training
    model.eval()
    n, spec = 0, {}
    try:
        for n, batch in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress), 1):
            try:
                _call(model, batch)
                spec = spec or input_spec(batch)
            except LowbitError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LowbitError(
                    f"calibration batch {n - 1} ({_describe(batch)}) does not fit the model: {msg}"
                ) from None
    finally:
        model.train(was_training)
    if n == 0:
        raise LowbitError("the calibration set is empty: pass at least one batch")
    return n, spec
