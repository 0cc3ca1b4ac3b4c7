"""Backend registry: for each op, the kernels that can run it, keyed by what they support.

A backend is a function plus a ``supports(spec, device) -> bool`` predicate and a priority. ``select``
returns the highest-priority backend that supports the request; the reference backend of every op
supports everything, so selection never fails. ``prefer`` forces one backend by name: if it cannot run
the request, ``select`` raises (a user who forced a backend gets an error, not a silent fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    supports: Callable[[QuantSpec, torch.device], bool]
    priority: int = 0


_BACKENDS: dict[str, dict[str, Backend]] = {}


def register_backend(op: str, name: str, supports: Callable | None = None, priority: int = 0):
    """Decorator: register ``fn`` as backend ``name`` of ``op``."""

    def deco(fn: Callable) -> Callable:
        pred = supports or (lambda spec, device: True)
        _BACKENDS.setdefault(op, {})[name] = Backend(op, name, fn, pred, priority)
        return fn

    return deco


def backends(op: str) -> list[Backend]:
    """All backends of ``op``, best first."""
    return sorted(_BACKENDS.get(op, {}).values(), key=lambda b: -b.priority)


def select(op: str, spec: QuantSpec, device: torch.device, prefer: str | None = None) -> Backend:
    """The backend to run ``op`` for ``spec`` on ``device``."""
    table = _BACKENDS.get(op)
    if not table:
        raise LowbitError(f"no backend registered for op {op!r}")
    if prefer is not None:
        if prefer not in table:
            raise LowbitError(f"unknown backend {prefer!r} for {op}; known: {', '.join(table)}")
        if not table[prefer].supports(spec, device):
            raise LowbitError(f"backend {prefer!r} cannot run {op} for {spec.format} on {device}")
        return table[prefer]
    for b in backends(op):
        if b.supports(spec, device):
            return b
    raise LowbitError(f"no backend of {op} supports {spec.format} on {device}")
