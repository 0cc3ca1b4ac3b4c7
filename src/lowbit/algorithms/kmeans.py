"""Non-uniform tables fitted by weighted k-means (SqueezeLLM, Kim et al. 2023): the table formats
lut2..lut4 (``lowbit.core.formats.TABLE_FORMATS``).

A weight ``(rows, cols)`` quantized to ``lut<b>`` keeps ``K = 2**b`` levels per output channel
(``PerChannel(0)``) or one set for the whole tensor (``PerTensor()``), placed by 1-D k-means that
minimises ``sum_i imp_i (w_i - level(q_i))^2``. ``importance`` weighs each element (SqueezeLLM: the
Fisher diagonal; GPTQ here: diag(H) per input column); None weighs all alike. Lloyd iterations run
from two starts (``lloyd``) and the better result is kept per table; a cluster that empties keeps its
level.

Stored (``QuantizedTensor``): ``scale`` = the largest ``|level|`` of each table (``qparam_shape``,
``spec.scale_dtype``; 1 for an all-zero table), ``levels`` = the table divided by it, in
``spec.scale_dtype``, ascending, shape ``(rows, K)`` or ``(1, K)``, and ``codes`` (uint8) = the index of
the stored level nearest to each ``w / scale``, so ``levels[row, code] * scale[row]`` is what the codes
were chosen for.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import check_finite
from lowbit.core.spec import PerTensor, QuantSpec

Tensor = torch.Tensor


def midpoints(levels: Tensor) -> Tensor:
    """``(R, K - 1)`` midpoints between consecutive levels of each row of ascending ``levels (R, K)``."""
    return ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()


def nearest(v: Tensor, levels: Tensor, mids: Tensor | None = None) -> Tensor:
    """Index (int64, ``v``'s shape ``(R, n)``) of the nearest of each row's ascending ``levels (R, K)``
    (``R`` may be 1 for one shared table); a value halfway goes to the lower level, as ``quantize``'s
    codebook rounding (``torch.bucketize``). ``mids``: ``midpoints(levels)`` when already built."""
    mids = midpoints(levels) if mids is None else mids
    if mids.shape[0] != v.shape[0]:
        mids = mids.expand(v.shape[0], -1).contiguous()
    return torch.searchsorted(mids, v.contiguous())


def _quantile_init(w: Tensor, imp: Tensor, k: int) -> Tensor:
    """(R, k) weighted quantiles of each row of ``w`` at ``(j + 1/2) / k``."""
    order = w.argsort(dim=1)
    ws, cum = w.gather(1, order), imp.gather(1, order).cumsum(1)
    total = cum[:, -1:].clamp_min(1e-30)
    q = (torch.arange(k, dtype=w.dtype, device=w.device) + 0.5) / k
    at = torch.searchsorted(cum / total, q.expand(w.shape[0], -1).contiguous()).clamp_max(w.shape[1] - 1)
    return ws.gather(1, at)


def _spread_init(w: Tensor, k: int) -> Tensor:
    """(R, k) normal-float levels (quantiles of N(0, 1) at ``linspace(1/2k, 1 - 1/2k, k)``, as NF4's)
    scaled to each row's absmax: more room for the tails than the quantile start."""
    p = torch.linspace(0.5 / k, 1 - 0.5 / k, k, dtype=torch.float64)
    z = torch.special.ndtri(p)
    levels = (z / z.abs().max()).to(w.dtype).to(w.device)
    return w.abs().amax(1, keepdim=True) * levels


def _objective(w: Tensor, imp: Tensor, c: Tensor) -> Tensor:
    """(R,) weighted squared error of each row of ``w`` at its nearest of the ascending levels ``c``."""
    return (imp * (c.gather(1, nearest(w, c)) - w).square()).sum(1)


def _lloyd_from(w: Tensor, imp: Tensor, c: Tensor, iters: int) -> Tensor:
    for _ in range(iters):
        c = c.sort(dim=1).values
        idx = nearest(w, c)
        sums = torch.zeros_like(c).scatter_add_(1, idx, imp * w)
        mass = torch.zeros_like(c).scatter_add_(1, idx, imp)
        new = torch.where(mass > 0, sums / mass.clamp_min(1e-30), c)
        done = bool(((new - c).abs() <= 1e-7 * c.abs().amax(1, keepdim=True).clamp_min(1e-30)).all())
        c = new
        if done:
            break
    return c.sort(dim=1).values


def lloyd(w: Tensor, imp: Tensor, k: int, iters: int = 25) -> Tensor:
    """Ascending levels ``(R, k)`` of each row of ``w (R, n)`` under element weights ``imp (R, n)``: Lloyd
    iterations from two starts (weighted quantiles; normal-float levels), the better kept per row (1-D
    Lloyd stalls in local optima that depend on the start)."""
    a = _lloyd_from(w, imp, _quantile_init(w, imp, k), iters)
    b = _lloyd_from(w, imp, _spread_init(w, k), iters)
    better = (_objective(w, imp, b) < _objective(w, imp, a))[:, None]
    return torch.where(better, b, a)


def kmeans(
    weight: Tensor, spec: QuantSpec, importance: Tensor | None = None, iters: int = 25, name: str = "weight"
) -> QuantizedTensor:
    """``weight (rows, cols)`` quantized to the table format of ``spec`` (module docstring).
    ``importance``: ``(rows, cols)`` or ``(cols,)`` non-negative weights, or None."""
    fmt = spec.fmt
    if fmt.kind != "table":
        raise LowbitError(f"{name}: kmeans fits table formats (lut2..lut4), got {spec.format}")
    if weight.ndim != 2:
        raise LowbitError(f"{name}: kmeans needs a 2-d (out, in) weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    w = weight.detach().float()
    imp = torch.ones_like(w) if importance is None else importance.detach().float().expand_as(w)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise LowbitError(f"{name}: importance must be finite and non-negative")
    per_tensor = isinstance(spec.granularity, PerTensor)
    rows = w.reshape(1, -1) if per_tensor else w
    imp = imp.reshape(rows.shape)
    imp = torch.where(imp.sum(1, keepdim=True) > 0, imp, torch.ones_like(imp))  # all-zero rows: uniform
    c = lloyd(rows, imp, fmt.n_codes, iters)
    amax = c.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)).to(spec.torch_scale_dtype)
    levels = (c / scale.float()).to(spec.torch_scale_dtype).sort(dim=1).values
    codes = nearest(rows / scale.float(), levels.float()).to(torch.uint8).reshape(w.shape)
    return QuantizedTensor(codes, scale, None, spec, levels)
