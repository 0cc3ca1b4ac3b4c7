"""``mse``: the clipping range that minimises the expected squared quantization error.

The observed distribution is the per-channel histogram (``lowbit.observers.histogram``) with mass
uniform inside each bin. Candidates are ranges ``[r_lo * min, r_hi * max]`` with ratios from the
coarse-to-fine grid of ``lowbit.observers.search`` (1 down to 0.0047; 39 per 1-d search; asymmetric
specs refine each end alone). For each candidate's grid (from ``qparams_from_range``):

* integer formats: the exact expected error of that piecewise-uniform density, from the closed-form
  integral of ``(x - fq(x))^2`` (a sawtooth of period ``scale`` between the lowest and highest level,
  ``(x - edge)^2`` beyond them), so rounding and clipping error are both counted at any bin width;
* float and codebook formats: the error of each bin's center under ``quantize``/``dequantize``.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.core.primitives import dequantize, qparams_from_range, quantize
from lowbit.core.spec import PerChannel, QuantSpec
from lowbit.observers.base import Tensor, register_observer
from lowbit.observers.histogram import BINS, HistogramObserver
from lowbit.observers.search import Bins, int_grid, search_range


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """Per channel, the range ``[r_lo * min, r_hi * max]`` of least expected squared error."""

    def __init__(self, spec: QuantSpec, *, name: str = "observer", bins: int = BINS) -> None:
        super().__init__(spec, name=name, bins=bins)

    def _range(self) -> tuple[Tensor, Tensor]:
        hist, lo, hi = self._seen()
        cost = int_mse if self.spec.fmt.kind == "int" else center_mse
        return search_range(hist, lo, hi, self.spec, cost)


def int_mse(bins: Bins, cand_lo: Tensor, cand_hi: Tensor, spec: QuantSpec) -> Tensor:
    """Expected squared error ``(K, c)`` (units of ``x``^2 times count) of each candidate integer grid."""
    s, low, high = int_grid(cand_lo, cand_hi, spec)
    left = (bins.start[:, None] + bins.index * bins.width[:, None])[None]  # (1, c, M)
    right = left + bins.width[None, :, None]
    span = (_integral(right, s, low, high) - _integral(left, s, low, high)).clamp(min=0.0)
    return (span / torch.where(bins.width > 0, bins.width, 1.0)[:, None] * bins.counts).sum(-1)


def _integral(x: Tensor, s: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Antiderivative of ``(x - fq(x))^2``: a sawtooth of period ``s`` between the levels ``low`` and
    ``high`` (``round`` to a multiple of ``s``), ``(x - edge)^2`` beyond them."""
    inside = torch.minimum(torch.maximum(x, low), high)
    n = ((inside - low) / s + 0.5).long().double() + torch.round(low / s)  # round(inside / s), cast-based
    r = inside - n * s
    return n * s**3 / 12 + (r**3 + s**3 / 8) / 3 + (x - inside) ** 3 / 3


def center_mse(bins: Bins, cand_lo: Tensor, cand_hi: Tensor, spec: QuantSpec) -> Tensor:
    """Squared error ``(K, c)`` of the bin centers under each candidate's ``quantize``/``dequantize``."""
    (k, c), m = cand_lo.shape, bins.index.shape[1]
    centers = bins.start[:, None] + (bins.index + 0.5) * bins.width[:, None]
    x = centers.float().expand(k, c, m).reshape(k * c, m)
    rows = dataclasses.replace(spec, granularity=PerChannel(0))
    scale, zp = qparams_from_range(cand_lo.reshape(-1, 1), cand_hi.reshape(-1, 1), rows)
    fq = dequantize(quantize(x, scale, zp, rows), scale, zp, rows)
    return ((x - fq).double().reshape(k, c, m) ** 2 * bins.counts).sum(-1)
