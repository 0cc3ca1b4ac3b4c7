"""Clipping search shared by ``kl`` and ``mse``: per channel, the best ratios of the observed range.

A channel with observed ``[lo, hi]`` (exact min/max) tries ranges ``[r_lo * lo, r_hi * hi]``. Each 1-d
search is coarse to fine: 32 coarse ratios ``2 ** (-k / 4)``, ``k = 0 .. 31`` (1 down to 0.0047, 19%
apart), then 7 fine ones ``r * 2 ** (i / 16)``, ``i = 3 .. -3``, around the best coarse ``r`` (4.4%
apart, capped at 1): 39 candidates.

1. both ends together (``r_lo = r_hi``); for a symmetric spec (only ``max(|lo|, |hi|)`` matters) this
   is the answer;
2. asymmetric spec with data on both sides of 0: then ``r_hi`` alone, then ``r_lo`` alone (one
   coordinate-descent pass, 3 x 39 candidates).

``qparams_from_range`` keeps 0 inside an asymmetric range, so all->=0 data (post-ReLU) searches
``[0, r * hi]`` in step 1 and skips step 2. Each candidate is scored on the grid ``qparams_from_range``
gives it, i.e. the grid ``qparams()`` will use. Ties go to the larger ratio; a constant channel keeps
ratio 1 (its exact round-trip rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lowbit.core.primitives import qparams_from_range
from lowbit.core.spec import QuantSpec
from lowbit.observers.histogram import Histogram

Tensor = torch.Tensor
# candidate x bin elements per cost call: below torch's parallel grain (32768), so each op runs on one
# thread; a 2-core machine with a busy core otherwise stalls on the thread barrier of every op
CHUNK = 1 << 15
CELLS = 256  # codes of the widest integer grid (8 bits): kl's per-cell temporaries


class Bins(NamedTuple):
    """The non-empty bins of ``c`` channels, what the costs sum over.

    ``counts``/``index`` ``(c, M)``: count and bin number, each channel's non-empty bins first, then empty
    bins as padding (``M`` = most non-empty bins of a channel); ``start``/``width`` ``(c,)`` float64 as in
    ``Histogram``; ``size``: bins per channel of the histogram.
    """

    counts: Tensor
    index: Tensor
    start: Tensor
    width: Tensor
    size: int

    @classmethod
    def of(cls, hist: Histogram) -> Bins:
        full = hist.counts > 0
        used = max(1, int(full.sum(1).max()))
        index = torch.argsort((~full).to(torch.uint8), dim=1, stable=True)[:, :used]
        return cls(hist.counts.gather(1, index), index, hist.start, hist.width, hist.bins)

    def rows(self, sl: slice) -> Bins:
        return Bins(self.counts[sl], self.index[sl], self.start[sl], self.width[sl], self.size)


# cost(bins of c channels, cand_lo (K, c), cand_hi (K, c), spec) -> (K, c)
Cost = Callable[[Bins, Tensor, Tensor, QuantSpec], Tensor]
Ends = Callable[[Tensor], tuple[Tensor, Tensor]]  # varying ratios (K, C) -> (r_lo, r_hi) (K, C)


def search_range(
    hist: Histogram, lo: Tensor, hi: Tensor, spec: QuantSpec, cost: Cost
) -> tuple[Tensor, Tensor]:
    """Clipped ``(lo, hi)`` ``(C,)`` float32 of least ``cost``; ``lo``/``hi`` are the exact min/max."""
    bins = Bins.of(hist)
    r_lo = r_hi = _search(bins, lo, hi, spec, cost, lambda r: (r, r))
    both = (lo < 0) & (hi > 0)  # only these channels have two ends to move apart (and lo <= hi stays)
    if not spec.symmetric and bool(both.any()):
        r_hi = _search(bins, lo, hi, spec, cost, lambda r: (r_lo.expand_as(r), torch.where(both, r, r_lo)))
        r_lo = _search(bins, lo, hi, spec, cost, lambda r: (torch.where(both, r, r_hi), r_hi.expand_as(r)))
    const = lo == hi
    return clipped(torch.where(const, 1.0, r_lo), lo), clipped(torch.where(const, 1.0, r_hi), hi)


def clipped(ratio: Tensor, v: Tensor) -> Tensor:
    """``ratio * v`` in float64, rounded to float32: the one formula for candidates and the result."""
    return (ratio * v.double()).float()


def int_grid(cand_lo: Tensor, cand_hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Step, lowest and highest level ``(K, c, 1)`` float64 of each candidate's integer grid."""
    scale, zp = qparams_from_range(cand_lo, cand_hi, spec)
    assert zp is not None
    fmt = spec.fmt
    s, z = scale.double()[..., None], zp.double()[..., None]
    return s, (fmt.qmin - z) * s, (fmt.qmax - z) * s


def _search(bins: Bins, lo: Tensor, hi: Tensor, spec: QuantSpec, cost: Cost, ends: Ends) -> Tensor:
    """Best varying ratio ``(C,)`` float64: coarse grid, then fine steps around the coarse best."""
    nch = len(lo)
    coarse = torch.pow(2.0, -torch.arange(32, dtype=torch.float64) / 4)[:, None].expand(32, nch)
    best = _best(bins, lo, hi, spec, cost, ends, coarse)
    steps = torch.pow(2.0, torch.arange(3, -4, -1, dtype=torch.float64) / 16)
    return _best(bins, lo, hi, spec, cost, ends, (steps[:, None] * best).clamp(max=1.0))


def _best(
    bins: Bins, lo: Tensor, hi: Tensor, spec: QuantSpec, cost: Cost, ends: Ends, ratios: Tensor
) -> Tensor:
    """Per channel, the candidate of ``ratios (K, C)`` (descending) of least cost.

    Cost calls get at most ``CHUNK`` candidate-bin pairs (channels and candidates split as needed).
    """
    k, nch = ratios.shape
    pairs = max(1, CHUNK // (bins.index.shape[1] + 2 + CELLS))
    step_c, step_k = max(1, pairs // k), min(k, pairs)
    r_lo, r_hi = ends(ratios)
    best = torch.ones(nch, dtype=torch.float64)
    for c0 in range(0, nch, step_c):
        sl = slice(c0, c0 + step_c)
        part = bins.rows(sl)
        scores = []
        for k0 in range(0, k, step_k):
            ks = slice(k0, k0 + step_k)
            cand_lo, cand_hi = clipped(r_lo[ks, sl], lo[None, sl]), clipped(r_hi[ks, sl], hi[None, sl])
            scores.append(cost(part, cand_lo, cand_hi, spec))
        best[sl] = ratios[:, sl].gather(0, torch.cat(scores).argmin(0, keepdim=True))[0]
    return best
