"""``kl``: entropy calibration (TensorRT / ONNX Runtime): the clipping range of least KL(P || Q).

For each candidate range ``[r_lo * min, r_hi * max]`` (ratios from the coarse-to-fine grid of
``lowbit.observers.search``, 1 down to 0.0047) and its integer grid from ``qparams_from_range`` (step
``s``, levels ``low .. high``), over the bins of the per-channel histogram:

* P, the clipped reference: every bin's count, with the mass of bins whose center lies beyond
  ``low`` or ``high`` moved into the bin holding that level (TensorRT adds outliers to the edge bin);
* Q, its quantized version: the bins are grouped into the format's cells (code of the bin center,
  ``round(center / s) + zero_point``); each cell's in-range mass (centers in ``[low, high]``; outliers
  excluded, as in TensorRT) is spread evenly over the cell's bins where P is non-zero;
* score ``sum p log(p / q)`` of the normalised P and Q (q floored at 1e-12 where p > 0).

Levels: the cells are the real grid, so the format's levels on each side are used as they fall. A
symmetric spec grids ``[-T, T]`` (int8: 127 steps up, 128 down; data that is all >= 0 uses the 127
positive ones). An asymmetric spec grids ``[r_lo * min(min, 0), r_hi * max(max, 0)]`` with all
``qmax - qmin`` steps, so post-ReLU activations (all >= 0) get the full unsigned grid over ``[0, T]``
(uint8: 255 steps); data on both sides searches a common ratio, then each end alone.
Candidates whose step is narrower than a histogram bin (KL cannot see their rounding) are skipped.

Exact zeros: post-ReLU data put half their mass in the first bin (exact zeros, which every candidate
represents exactly). Left in, that spike is what Q smears over the first cell, a cost that shrinks with
the cell, so the search drifts to tiny ranges. For one-sided data (histogram starting at 0) the first
bin is left out of P and Q.
Integer formats only (KL needs the uniform grid); float/codebook formats: use ``mse``.
"""

from __future__ import annotations

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.observers.base import Tensor, register_observer
from lowbit.observers.histogram import BINS, HistogramObserver
from lowbit.observers.search import Bins, int_grid, search_range


@register_observer("kl")
class KLObserver(HistogramObserver):
    """Per channel, the range ``[r_lo * min, r_hi * max]`` of least KL divergence."""

    def __init__(self, spec: QuantSpec, *, name: str = "observer", bins: int = BINS) -> None:
        super().__init__(spec, name=name, bins=bins)
        if spec.fmt.kind != "int":
            raise LowbitError(
                f"observer {name!r} (kl): format {spec.format} has no uniform integer grid; use 'mse'"
            )

    def _range(self) -> tuple[Tensor, Tensor]:
        hist, lo, hi = self._seen()
        return search_range(hist, lo, hi, self.spec, kl_cost)


def kl_cost(bins: Bins, cand_lo: Tensor, cand_hi: Tensor, spec: QuantSpec) -> Tensor:
    """KL(P || Q) ``(K, c)`` of each candidate integer grid (see the module docstring); inf if skipped."""
    s, low, high = int_grid(cand_lo, cand_hi, spec)
    valid = s[..., 0] >= bins.width  # the step spans at least one bin
    out = torch.full(valid.shape, torch.inf, dtype=torch.float64)
    rows = valid.any(1).nonzero().squeeze(1)
    if len(rows):
        kl = _kl(bins, s[rows], low[rows], high[rows], spec.fmt.qmax - spec.fmt.qmin + 1)
        out[rows] = torch.where(valid[rows], kl, torch.inf)
    return out


def _kl(bins: Bins, s: Tensor, low: Tensor, high: Tensor, ncells: int) -> Tensor:
    """KL ``(K, c)`` for grids of step ``s`` and levels ``low .. high`` ``(K, c, 1)`` over the non-empty
    bins (plus an entry per clipped side whose level's bin is empty); float32 inside."""
    start = bins.start[:, None]
    w = torch.where(bins.width > 0, bins.width, 1.0)[:, None]
    h = bins.counts.float()[None]  # (1, c, M)
    zeros = (bins.index == 0) & (bins.start == 0)[:, None]  # exact zeros of one-sided data (docstring)
    h = torch.where(zeros[None], 0.0, h)
    centers = (start + (bins.index + 0.5) * w)[None]
    cell = ((centers - low) / s + 0.5).long().clamp_(0, ncells - 1)  # code - qmin (round, as a cast)
    below, above = (centers < low).float(), (centers > high).float()
    inside = h * (1.0 - below - above)
    p, edge_p, edge_cell = inside, [], []
    for side, level, code in ((below, low, 0), (above, high, ncells - 1)):
        out = (h * side).sum(-1, keepdim=True)  # clipped mass, moved into the bin holding the level
        edge = ((level - start) / w).floor_().clamp_(0, bins.size - 1)
        match = (bins.index[None] == edge).float()
        p = p + out * match
        edge_p.append(out * (1.0 - match.amax(-1, keepdim=True)))  # that bin is not listed: its own entry
        edge_cell.append(torch.full_like(out, code, dtype=torch.long))
    p, cell = torch.cat([p, *edge_p], -1), torch.cat([cell, *edge_cell], -1)
    mass = torch.zeros(*p.shape[:2], ncells).scatter_add_(2, cell[..., : h.shape[-1]], inside)
    nonzero = (p > 0).float()
    spread = torch.zeros_like(mass).scatter_add_(2, cell, nonzero)
    q = nonzero * (mass / spread.clamp_(min=1.0)).gather(2, cell)
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True).clamp_(min=1e-30)
    terms = torch.xlogy(p, p) - torch.xlogy(p, q.clamp_(min=1e-12))  # xlogy: no thread-pool barrier
    return torch.nan_to_num(terms.sum(-1).double(), nan=torch.inf)
