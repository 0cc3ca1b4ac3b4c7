"""Exact per-layer choice under a budget: the multiple-choice knapsack, solved by dynamic programming.

Each layer ``i`` has candidates ``k`` with an integer cost ``costs[i][k]`` (bytes, or any additive unit)
and a predicted loss ``losses[i][k]`` (additive over layers). ``Frontier`` holds, for every total cost
``c`` up to the largest reachable, the least total loss of a choice costing at most ``c``; from it:

- ``at_most(max_cost)``: least loss under a cost budget (size or latency budget);
- ``cheapest(max_loss)``: least cost whose loss stays within a loss budget;
- ``pareto(n)``: ``n`` points of the cost/loss curve.

Costs are counted in units of ``unit`` (each candidate's cost above its layer's cheapest candidate, rounded
up), so a returned choice never costs more than its budget in the original unit; with ``unit=1`` the
solution is exact. Memory: one int8 (or int16) argmin per layer per cost unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowbit.core.errors import LowbitError

MAX_STATES = 400_000  # cost units a frontier spans at most (``unit`` grows to keep under it)


@dataclass(frozen=True)
class Choice:
    """One solution: ``picks[i]`` is the candidate index of layer ``i``; ``cost`` in the original unit."""

    picks: tuple[int, ...]
    cost: int
    loss: float


class Frontier:
    """Least total loss for every cost budget (module docstring); build with ``frontier``."""

    def __init__(self, costs, losses, base: int, unit: int, best: torch.Tensor, arg: torch.Tensor):
        self.costs, self.losses, self.base, self.unit = costs, losses, base, unit
        self.best, self.arg = best, arg  # best[u]: least loss at <= u extra units; arg[i, u]: layer i's pick

    @property
    def min_cost(self) -> int:
        """Cost of the cheapest choice (every layer at its cheapest candidate)."""
        return self.base

    @property
    def max_cost(self) -> int:
        """Cost of the most expensive choice."""
        return sum(max(c) for c in self.costs)

    def _choice(self, u: int) -> Choice:
        picks, u = [], int(u)
        for i in range(len(self.costs) - 1, -1, -1):
            k = int(self.arg[i, u])
            picks.append(k)
            u -= _units(self.costs[i], self.unit)[k]
        picks.reverse()
        cost = sum(c[k] for c, k in zip(self.costs, picks, strict=True))
        loss = sum(lo[k] for lo, k in zip(self.losses, picks, strict=True))
        return Choice(tuple(picks), cost, loss)

    def at_most(self, max_cost: int) -> Choice:
        """Least-loss choice costing at most ``max_cost``; ``LowbitError`` if even the cheapest costs more."""
        if max_cost < self.base:
            raise LowbitError(
                f"budget {max_cost} is below the cheapest plan ({self.base}: every layer at its smallest "
                "candidate); raise the budget or add a smaller candidate"
            )
        u = min((max_cost - self.base) // self.unit, self.best.numel() - 1)
        return self._choice(u)

    def cheapest(self, max_loss: float) -> Choice:
        """Least-cost choice whose predicted loss is at most ``max_loss``; ``LowbitError`` naming the
        least reachable loss if none is."""
        ok = (self.best <= max_loss).nonzero()
        if ok.numel() == 0:
            least = float(self.best[-1])
            raise LowbitError(
                f"no plan reaches a predicted loss of {max_loss:.4g}: the least reachable is {least:.4g} "
                f"(every layer at its most accurate candidate, cost {self.max_cost})"
            )
        return self._choice(int(ok[0]))

    def pareto(self, n: int) -> list[Choice]:
        """Up to ``n`` distinct choices spread evenly over the cost range, cheapest first."""
        last = self.best.numel() - 1
        points = sorted({round(last * j / max(n - 1, 1)) for j in range(n)})
        out: list[Choice] = []
        for u in points:
            c = self._choice(u)
            if not out or c.picks != out[-1].picks:
                out.append(c)
        return out


def _units(costs: Sequence[int], unit: int) -> list[int]:
    """Extra cost of each candidate over the layer's cheapest, in units, rounded up."""
    low = min(costs)
    return [math.ceil((c - low) / unit) for c in costs]


def _check(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]]) -> None:
    if not costs or len(costs) != len(losses):
        raise LowbitError(
            f"need one cost list and one loss list per layer, got {len(costs)} and {len(losses)}"
        )
    for i, (c, lo) in enumerate(zip(costs, losses, strict=True)):
        if not c or len(c) != len(lo):
            raise LowbitError(f"layer {i}: {len(c)} costs for {len(lo)} losses (need the same, at least one)")
        if len(c) > 127:
            raise LowbitError(f"layer {i}: {len(c)} candidates; at most 127")
        if any(int(x) != x or x < 0 for x in c):
            raise LowbitError(f"layer {i}: costs must be non-negative integers, got {list(c)}")
        if not all(math.isfinite(x) for x in lo):
            raise LowbitError(f"layer {i}: losses must be finite, got {list(lo)}")


def frontier(
    costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], unit: int | None = None
) -> Frontier:
    """The ``Frontier`` of ``costs[i][k]`` / ``losses[i][k]`` (module docstring). ``unit``: cost resolution
    (default: the smallest that keeps the table within ``MAX_STATES`` units; 1 when that fits)."""
    _check(costs, losses)
    costs = [[int(x) for x in c] for c in costs]
    losses = [[float(x) for x in lo] for lo in losses]
    span = sum(max(c) - min(c) for c in costs)
    unit = unit or max(1, math.ceil(span / MAX_STATES))
    n = sum(max(_units(c, unit)) for c in costs) + 1
    best = torch.zeros(n, dtype=torch.float64)  # no layer yet: loss 0 at any budget
    arg = torch.zeros(len(costs), n, dtype=torch.int8)
    for i, (c, lo) in enumerate(zip(costs, losses, strict=True)):
        nxt = torch.full((n,), math.inf, dtype=torch.float64)
        for k, (u, loss) in enumerate(zip(_units(c, unit), lo, strict=True)):
            cand = torch.full((n,), math.inf, dtype=torch.float64)
            cand[u:] = best[: n - u] + loss
            better = cand < nxt
            nxt = torch.where(better, cand, nxt)
            arg[i][better] = k
        best = nxt
    return Frontier(costs, losses, sum(min(c) for c in costs), unit, best, arg)
