"""The channel rescalings that keep a float model's function, recorded per layer.

AWQ and SmoothQuant fold equivalence scales into norms and into the Linears before them; static W8A8
equalizes and stretches conv channels. The quantized layers' weights then hold the float weights in
another basis: ``W' = diag(rows) W`` with the entries reading input channel ``i`` multiplied by
``inputs[i]`` (groups-aware for convolutions), and the bias multiplied by ``rows``. Every rescaling is
recorded on the model as ``model.lowbit_basis = {fqn: {"rows": (out,), "inputs": (in,)}}`` (float64;
several rescalings of one layer multiply), saved with the checkpoint, so the float weights can be put
into the quantized layers' basis exactly (``to_basis``) for per-layer error reports.

``model.lowbit_basis`` is ``{}`` when nothing was rescaled and ``None`` (or absent) when unknown.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.equalize import scale_inputs
from lowbit.core.errors import LowbitError

KINDS = ("rows", "inputs")
Basis = dict[str, dict[str, torch.Tensor]]


def record(basis: Basis, fqn: str, *, rows: torch.Tensor | None = None, inputs=None) -> None:
    """Multiply factors into ``basis[fqn]``: ``rows (out,)`` of the weight and bias, ``inputs (in,)``."""
    entry = basis.setdefault(fqn, {})
    for kind, v in (("rows", rows), ("inputs", inputs)):
        if v is not None:
            v = v.detach().double().flatten().cpu()
            entry[kind] = entry[kind] * v if kind in entry else v.clone()


def record_on(model: nn.Module, fqn: str, **factors) -> None:
    """``record`` into ``model.lowbit_basis`` (created when absent)."""
    if getattr(model, "lowbit_basis", None) is None:
        model.lowbit_basis = {}
    record(model.lowbit_basis, fqn, **factors)


def merge_into(model: nn.Module, basis: Basis) -> None:
    """Compose ``basis`` into ``model.lowbit_basis`` (later rescalings multiply earlier ones)."""
    if getattr(model, "lowbit_basis", None) is None:
        model.lowbit_basis = {}
    for fqn, entry in basis.items():
        record(model.lowbit_basis, fqn, **entry)


def to_basis(
    weight: torch.Tensor, bias: torch.Tensor | None, entry: dict | None, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float ``weight (out, in / groups, ...)`` and ``bias (out,)`` in the basis of ``entry`` (float64)."""
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    if not entry:
        return w, b
    rows, inputs = entry.get("rows"), entry.get("inputs")
    if rows is not None:
        if rows.numel() != w.shape[0]:
            raise LowbitError(f"basis rows ({rows.numel()}) do not match the weight {tuple(w.shape)}")
        w = w * rows.reshape(-1, *([1] * (w.dim() - 1)))
        b = None if b is None else b * rows
    if inputs is not None:
        if inputs.numel() != w.shape[1] * groups:
            raise LowbitError(f"basis inputs ({inputs.numel()}) do not match the weight {tuple(w.shape)}")
        w = scale_inputs(w, inputs, groups)
    return w, b


def to_tensors(basis: Basis) -> dict[str, torch.Tensor]:
    """``basis`` as flat safetensors entries ``PREFIX + fqn + "/" + kind`` (float64)."""
    return {f"{PREFIX}{fqn}/{kind}": v.contiguous() for fqn, e in basis.items() for kind, v in e.items()}


def from_tensors(tensors: dict[str, torch.Tensor]) -> Basis:
    """Pop the ``to_tensors`` entries out of ``tensors`` and return them as a basis."""
    basis: Basis = {}
    for key in [k for k in tensors if k.startswith(PREFIX)]:
        fqn, _, kind = key[len(PREFIX) :].rpartition("/")
        t = tensors.pop(key)
        if (
            kind not in KINDS
            or not fqn
            or t.dim() != 1
            or not bool(torch.isfinite(t).all() and (t > 0).all())
        ):
            raise LowbitError(f"basis tensor {key}: expected a finite positive vector of rows or inputs")
        basis.setdefault(fqn, {})[kind] = t.double()
    return basis


PREFIX = "lowbit.basis."
