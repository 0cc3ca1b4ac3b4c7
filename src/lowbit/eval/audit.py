"""Subgroup audit: does quantization's loss fall evenly on the groups of the data?

Input: one score per sample for the float model and for the quantized model, in the same order (1/0 for a
correct top-1 prediction, agreement with the float model's label, or a negative loss: any per-sample score
where higher is better and the group metric is the mean), and each sample's group (a class, an article, a
user-given id). The degradation of a sample is ``reference - quantized``; of a group, its mean.

Per group: the float and quantized metric and the degradation, each with a 95% bootstrap interval
(samples of the group resampled with replacement, paired), and a one-sided permutation test of "this
group degrades more than the other samples": the group's labels are shuffled over all samples
``permutations`` times and the p-value is the share of shuffles whose gap (group mean degradation minus
the rest's) is at least the observed one (with the +1 correction, so it is never 0). p-values are
adjusted for the number of groups (Holm); a group is flagged when its adjusted p-value is below ``alpha``
and its excess degradation is at least ``min_excess``. A model audited against itself degrades nowhere
and flags nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lowbit.core.errors import LowbitError


@dataclass(frozen=True)
class GroupAudit:
    """One group's numbers. Metrics are means of the per-sample scores; ``*_ci``: 95% bootstrap interval
    (low, high); ``excess``: the group's mean degradation minus that of all other samples."""

    group: str
    n: int
    reference: float
    reference_ci: tuple[float, float]
    quantized: float
    quantized_ci: tuple[float, float]
    degradation: float
    degradation_ci: tuple[float, float]
    excess: float
    p_value: float  # one-sided permutation p-value, Holm-adjusted over the groups
    flagged: bool


@dataclass(frozen=True)
class Audit:
    """All groups (largest degradation first) and the overall numbers; ``flagged``: their names."""

    groups: list[GroupAudit]
    overall: GroupAudit
    alpha: float
    permutations: int

    @property
    def flagged(self) -> list[str]:
        return [g.group for g in self.groups if g.flagged]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "permutations": self.permutations,
            "overall": asdict(self.overall),
            "groups": [asdict(g) for g in self.groups],
            "flagged": self.flagged,
        }


def audit(
    reference: Sequence[float] | Tensor,
    quantized: Sequence[float] | Tensor,
    groups: Sequence[object],
    *,
    alpha: float = 0.05,
    min_excess: float = 0.0,
    permutations: int = 2000,
    bootstrap: int = 1000,
    seed: int = 0,
) -> Audit:
    """The audit of the module docstring. ``reference``, ``quantized``: per-sample scores ``(N,)``, higher
    better; ``groups``: ``N`` group labels (any hashable, reported as ``str``). Deterministic per ``seed``."""
    ref, q = _scores("reference", reference), _scores("quantized", quantized)
    if len(ref) != len(q) or len(groups) != len(ref):
        raise LowbitError(
            f"the audit needs one score per sample from each model and one group per sample, got "
            f"{len(ref)} reference scores, {len(q)} quantized scores and {len(groups)} group labels"
        )
    if not 0.0 < alpha < 1.0 or permutations < 1 or bootstrap < 1:
        raise LowbitError(f"alpha must be in (0, 1) and permutations, bootstrap >= 1, got {alpha}, "
                          f"{permutations}, {bootstrap}")  # fmt: skip
    names = sorted({str(g) for g in groups})
    index = {name: i for i, name in enumerate(names)}
    label = torch.tensor([index[str(g)] for g in groups])
    gen = torch.Generator().manual_seed(seed)
    delta = ref - q
    p_raw = _permutation_p(delta, label, len(names), permutations, gen)
    p_adj = _holm(p_raw)
    rows = []
    for i, name in enumerate(names):
        members = (label == i).nonzero().flatten()
        rest = delta[label != i]
        excess = float(delta[members].mean() - (rest.mean() if len(rest) else delta[members].mean()))
        flagged = bool(p_adj[i] < alpha and excess >= min_excess and excess > 0)
        rows.append(
            _summary(name, ref[members], q[members], excess, float(p_adj[i]), flagged, bootstrap, gen)
        )
    overall = _summary("all", ref, q, 0.0, 1.0, False, bootstrap, gen)
    rows.sort(key=lambda g: (-g.degradation, g.group))
    return Audit(rows, overall, alpha, permutations)


def _scores(name: str, x: Sequence[float] | Tensor) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if len(t) == 0:
        raise LowbitError(f"{name} scores are empty: the audit needs at least one sample")
    if not bool(torch.isfinite(t).all()):
        raise LowbitError(f"{name} scores hold NaN or Inf at sample {int((~torch.isfinite(t)).nonzero()[0])}")
    return t


def _permutation_p(delta: Tensor, label: Tensor, k: int, permutations: int, gen: torch.Generator) -> Tensor:
    """Per group, one-sided p-value of ``mean(delta | group) - mean(delta | rest)`` under shuffled labels."""
    n = len(delta)
    counts = torch.bincount(label, minlength=k).double()
    total = delta.sum()

    def gaps(lab: Tensor) -> Tensor:  # (..., k) from labels (..., n)
        sums = torch.zeros(*lab.shape[:-1], k, dtype=torch.float64).scatter_add_(
            -1, lab, delta.expand_as(lab)
        )
        rest = (n - counts).clamp_min(1)
        return sums / counts - (total - sums) / rest

    observed = gaps(label[None])[0]
    exceed = torch.zeros(k, dtype=torch.float64)
    for start in range(0, permutations, 256):
        m = min(256, permutations - start)
        perm = torch.argsort(torch.rand(m, n, generator=gen), dim=1)
        exceed += (gaps(label[perm]) >= observed - 1e-12).sum(0)
    return (exceed + 1) / (permutations + 1)


def _holm(p: Tensor) -> Tensor:
    """Holm's step-down adjustment of ``p`` (family-wise error over all entries)."""
    order = torch.argsort(p)
    k = len(p)
    adjusted = torch.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order.tolist()):
        running = max(running, min(1.0, float(p[i]) * (k - rank)))
        adjusted[i] = running
    return adjusted


def percentile_interval(x: Tensor, low: float = 0.025, high: float = 0.975) -> tuple[float, float]:
    """The ``low`` and ``high`` quantiles of bootstrap statistics ``x`` ``(B,)`` (float64): a percentile
    interval, 95% by default."""
    lo, hi = torch.quantile(x.double(), torch.tensor([low, high], dtype=torch.float64)).tolist()
    return (lo, hi)


def _summary(name, ref, q, excess, p, flagged, bootstrap, gen) -> GroupAudit:
    n = len(ref)
    idx = torch.randint(0, n, (bootstrap, n), generator=gen)
    r, qq = ref[idx].mean(1), q[idx].mean(1)
    ci = percentile_interval
    return GroupAudit(name, n, float(ref.mean()), ci(r), float(q.mean()), ci(qq), float((ref - q).mean()),
                      ci(r - qq), excess, p, flagged)  # fmt: skip
