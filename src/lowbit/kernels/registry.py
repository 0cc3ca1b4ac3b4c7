"""Backend registry: for each op, the kernels that can run it, keyed by what they support.

A backend is a function ``fn(x, layer)`` plus a ``supports(layer, device) -> bool`` predicate and a
priority. ``layer`` is a quantized module (duck-typed: ``qweight``, ``scale``, ``zero_point``, ``bias``,
``spec``, ``rows``, ``cols``). ``select`` returns the highest-priority backend that supports the request;
the reference backend of every op supports everything, so selection never fails. ``prefer`` forces one
backend by name: if it cannot run the request, ``select`` raises (a user who forced a backend gets an
error, not a silent fallback). A backend registered with ``exact=False`` (it rounds the activations) is
never selected by priority or by measurement, only by name.

Fast backends keep their own weight layout, built once from the stored buffers by ``prepared`` and
rebuilt when those buffers change (new tensors, in-place edits, another device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.errors import LowbitError


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    supports: Callable[[Any, torch.device], bool]
    priority: int = 0
    exact: bool = True  # False: rounds the activations (int8 dot products); never chosen by measurement


_BACKENDS: dict[str, dict[str, Backend]] = {}


def register_backend(
    op: str, name: str, supports: Callable | None = None, priority: int = 0, exact: bool = True
):
    """Decorator: register ``fn`` as backend ``name`` of ``op`` (``exact=False``: it changes the numerics,
    e.g. int8 activations, and runs only where asked for by name)."""

    def deco(fn: Callable) -> Callable:
        pred = supports or (lambda layer, device: True)
        _BACKENDS.setdefault(op, {})[name] = Backend(op, name, fn, pred, priority, exact)
        return fn

    return deco


def backends(op: str) -> list[Backend]:
    """All backends of ``op``, best first."""
    return sorted(_BACKENDS.get(op, {}).values(), key=lambda b: -b.priority)


def select(op: str, layer: Any, device: torch.device, prefer: str | None = None) -> Backend:
    """The backend to run ``op`` for ``layer`` on ``device``."""
    table = _BACKENDS.get(op)
    if not table:
        raise LowbitError(f"no backend registered for op {op!r}")
    if prefer is not None:
        if prefer not in table:
            raise LowbitError(f"unknown backend {prefer!r} for {op}; known: {', '.join(table)}")
        if not table[prefer].supports(layer, device):
            raise LowbitError(f"backend {prefer!r} cannot run {op} for {_describe(layer)} on {device}")
        return table[prefer]
    for b in backends(op):
        if b.exact and b.supports(layer, device):
            return b
    raise LowbitError(f"no backend of {op} supports {_describe(layer)} on {device}")


def _describe(layer: Any) -> str:
    return f"{layer.rows}x{layer.cols} {layer.spec.format} {layer.spec.granularity}"


def prepared(layer: Any, key: str, build: Callable[[], Any]) -> Any:
    """``build()``'s result, cached on ``layer`` under ``key`` until its stored buffers change."""
    token = tuple((t.data_ptr(), t._version, t.device) for t in (layer.qweight, layer.scale))
    cache = layer.__dict__.setdefault("_lowbit_prepared", {})
    hit = cache.get(key)
    if hit is None or hit[0] != token:
        hit = cache[key] = (token, build())
    return hit[1]


def dispatch(op: str, layer: Any, x: torch.Tensor, prefer: str | None = None) -> Callable:
    """The backend function for ``layer`` on ``x``: ``select(...).fn``, remembered on ``layer`` per (op,
    device, choice, scale dtype), so a forward pays for selection once, not on every call.

    Without ``prefer``, a layer with ``routes`` (measured advice, ``lowbit.kernels.advice``) runs the
    routed backend for ``x``'s row count, or normal selection where that backend cannot run."""
    name = prefer
    routes = getattr(layer, "routes", None)
    if name is None and routes:
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        name = next((b for limit, b in routes if rows <= limit), routes[-1][1])
    key = (op, x.device, name, prefer is not None, layer.scale.dtype)
    memo = layer.__dict__.setdefault("_lowbit_dispatch", {})
    fn = memo.get(key)
    if fn is None:
        if prefer is None and name is not None:
            table = _BACKENDS.get(op, {})
            b = table.get(name)
            fn = b.fn if b is not None and b.supports(layer, x.device) else select(op, layer, x.device).fn
        else:
            fn = select(op, layer, x.device, prefer).fn
        memo[key] = fn
    return fn
