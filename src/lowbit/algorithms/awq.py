"""Activation-aware weight quantization (AWQ, Lin et al. 2023): per-channel scales and range clipping.

Both searches score a candidate by the output error on calibration inputs ``x`` (rows ``n``, features
``in``): ``||x (W - W_q)^T||^2 = sum(D G * D)`` with ``D = W - W_q`` and the Gram matrix ``G = x^T x``
(``(in, in)``; per group ``(groups, g, g)`` for clipping), so each candidate costs ``out * in * in`` (or
``out * in * g``) flops whatever ``n`` is, and memory stays at the weight's size (no chunking needed).
Rows beyond ``max_rows`` are subsampled at evenly spaced positions (deterministic).

Equivalence-transform convention of ``awq_scales``: it returns ``s`` (``(in,)``); the caller multiplies
the weight columns of every consumer of ``x`` by ``s`` (``W[:, j] * s[j]``) and divides the producer of
``x`` by ``s`` (the preceding norm's weight, or the preceding Linear's output rows and bias), so the float
model computes the same function. ``awq_clip`` then runs on the scaled weight with the scaled input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowbit.algorithms.rtn import QuantizedTensor, rtn
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import (
    check_finite,
    dequantize,
    qparams_from_range,
    quantize,
    to_blocks,
)
from lowbit.core.spec import PerChannel, QuantSpec

Tensor = torch.Tensor


def awq_scales(
    weights: Sequence[Tensor],
    x: Tensor,
    spec: QuantSpec | Sequence[QuantSpec],
    *,
    grid: int = 20,
    max_rows: int = 4096,
    name: str = "weight",
) -> Tensor:
    """Per-input-channel AWQ scale ``s`` (``(in,)``, float32) for Linear weights sharing input ``x``.

    ``weights``: ``(out_i, in)`` each (e.g. the q, k, v projections); ``x``: ``(..., in)``. Candidates are
    ``s = mean|x|^a`` normalised by ``sqrt(max(s) * min(s))`` for ``a`` in ``0, 1/grid, ..., (grid-1)/grid``
    (AWQ's reference search); the one minimising ``sum_i ||x W_i^T - (x / s) Q_i(W_i * s)^T||^2`` wins,
    with ``Q_i`` RTN to ``spec``, or to ``spec[i]`` when given one spec per weight (Linears of one input
    quantized to different formats). ``a = 0`` gives ``s = 1`` (plain RTN), so the result is never
    worse on ``x``. A table format (lut<b>, fitted by k-means) is searched with its uniform proxy
    ``uint<b>`` per channel: refitting tables at every grid point would cost far more.
    """
    if grid < 1:
        raise LowbitError(f"grid must be >= 1, got {grid}")
    ws, x2 = _check_inputs(weights, x, name)
    specs = [spec] * len(ws) if isinstance(spec, QuantSpec) else list(spec)
    if len(specs) != len(ws):
        raise LowbitError(
            f"{name}: {len(specs)} specs for {len(ws)} weights: give one spec, or one per weight"
        )
    specs = [_search_proxy(sp) for sp in specs]
    x_mean = x2.abs().mean(0)
    xs = _subsample(x2, max_rows)
    gram = xs.T @ xs
    best_s, best_err = torch.ones_like(x_mean), math.inf
    for i in range(grid):
        s = x_mean.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        pairs = zip(ws, specs, strict=True)
        err = sum(_gram_error(w - rtn(w * s, sp, name).dequantize() / s, gram) for w, sp in pairs)
        if err < best_err:
            best_s, best_err = s, err
    return best_s


def _search_proxy(spec: QuantSpec) -> QuantSpec:
    """``spec``, or for a table format the asymmetric per-channel ``uint<bits>`` the scale search uses."""
    if spec.fmt.kind != "table":
        return spec
    return QuantSpec(f"uint{spec.fmt.bits}", False, PerChannel(0), spec.scale_dtype)


def awq_clip(
    weight: Tensor,
    x: Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_rows: int = 4096,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize ``weight`` (``(out, in)``) with per-block ranges shrunk to minimise the output error on ``x``.

    ``x``: ``(..., in)``. Each block (group, or row for ``PerChannel(0)``) tries ``r = 1 - k / grid`` for
    ``k = 0 .. int(max_shrink * grid) - 1`` (so ``r`` in ``(1 - max_shrink, 1]``) of its ``[min, max]``
    (symmetric specs: of its absmax) and keeps the ``r`` with the lowest ``||x_blk (w_blk - q(w_blk))^T||^2``
    over the sampled rows. ``r = 1`` is RTN, kept on ties: never worse than RTN on ``x``. The result has
    ``rtn``'s layout, qparams from ``qparams_from_range(lo * r, hi * r, spec)``.
    """
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise LowbitError(f"need grid >= 1 and 0 <= max_shrink < 1, got {grid} and {max_shrink}")
    (w,), x2 = _check_inputs([weight], x, name)
    block = spec.block_size(tuple(w.shape))
    if block[0] != 1:
        raise LowbitError(f"awq_clip needs blocks inside one row, got block {block} ({spec.granularity})")
    xb = torch.nan_to_num(to_blocks(_subsample(x2, max_rows), block), nan=0.0)  # (n, groups, g)
    gram = torch.einsum("ngk,ngl->gkl", xb, xb)
    lo, hi = _block_range(to_blocks(w, block))
    best_r, best_err = torch.ones_like(lo), torch.full_like(lo, math.inf, dtype=torch.float64)
    for k in range(max(1, int(max_shrink * grid))):
        r = 1.0 - k / grid
        scale, zp = qparams_from_range(lo * r, hi * r, spec)
        d = w - dequantize(quantize(w, scale, zp, spec, name), scale, zp, spec)
        db = torch.nan_to_num(to_blocks(d, block), nan=0.0)
        err = torch.einsum("ogk,gkl,ogl->og", db, gram, db).double()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, r, best_r)
    scale, zp = qparams_from_range(lo * best_r, hi * best_r, spec)
    return QuantizedTensor(quantize(w, scale, zp, spec, name), scale, zp, spec)


def _check_inputs(weights: Sequence[Tensor], x: Tensor, name: str) -> tuple[list[Tensor], Tensor]:
    """Float32 weights ``(out_i, in)`` and ``x`` as ``(n, in)``; ``LowbitError`` naming shapes otherwise."""
    if len(weights) == 0:
        raise LowbitError(f"{name}: no weights given")
    if x.ndim < 2:
        raise LowbitError(f"input x of {name} must be (n, in), got shape {tuple(x.shape)}")
    out = []
    for i, w in enumerate(weights):
        label = name if len(weights) == 1 else f"{name}[{i}]"
        if w.ndim != 2 or w.shape[1] != x.shape[-1]:
            raise LowbitError(
                f"{label} shape {tuple(w.shape)} does not match input x shape {tuple(x.shape)}: "
                f"need a 2-D weight (out, {x.shape[-1]})"
            )
        check_finite(w, label)
        out.append(w.detach().float())
    if x.numel() == 0:
        raise LowbitError(f"input x of {name} has no rows (shape {tuple(x.shape)})")
    check_finite(x, f"input x of {name}")
    return out, x.detach().float().reshape(-1, x.shape[-1])


def _subsample(x: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` rows of ``x`` (``(n, in)``) at evenly spaced positions (deterministic)."""
    if max_rows < 1:
        raise LowbitError(f"max_rows must be >= 1, got {max_rows}")
    if x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
    return x[idx]


def _gram_error(d: Tensor, gram: Tensor) -> float:
    """``||x d^T||^2`` from ``gram = x^T x``: ``d`` ``(out, in)``, ``gram`` ``(in, in)``."""
    return float(((d @ gram) * d).sum(dtype=torch.float64))


def _block_range(wb: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max over the last dim of blocks ``(..., block)``, ignoring NaN padding."""
    nan = torch.isnan(wb)
    lo = torch.where(nan, math.inf, wb).amin(-1)
    hi = torch.where(nan, -math.inf, wb).amax(-1)
    return lo, hi
