"""The multiple-choice knapsack: exact against brute force, budgets respected, clear errors."""

import itertools
import random

import pytest

from lowbit.algorithms.allocate import frontier
from lowbit.core.errors import LowbitError


def _instance(seed, layers=5, cands=3):
    rng = random.Random(seed)
    costs = [sorted(rng.randrange(1, 60) for _ in range(cands)) for _ in range(layers)]
    losses = [sorted((rng.random() for _ in range(cands)), reverse=True) for _ in range(layers)]
    return costs, losses


def _brute(costs, losses, budget):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[k] for c, k in zip(costs, picks, strict=True))
        loss = sum(lo[k] for lo, k in zip(losses, picks, strict=True))
        if cost <= budget and (best is None or loss < best[1] - 1e-12):
            best = (cost, loss)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_least_loss_under_budget_equals_brute_force(seed):
    costs, losses = _instance(seed)
    f = frontier(costs, losses, unit=1)
    for budget in range(f.min_cost, f.max_cost + 1, 7):
        got = f.at_most(budget)
        assert got.cost <= budget
        assert got.loss == pytest.approx(_brute(costs, losses, budget)[1])


def test_coarse_unit_never_exceeds_the_budget():
    costs, losses = _instance(3, layers=12)
    f = frontier(costs, losses, unit=7)
    for budget in range(f.min_cost, f.max_cost + 1, 5):
        assert f.at_most(budget).cost <= budget


def test_cheapest_meets_a_loss_budget_at_least_cost():
    costs, losses = _instance(1)
    f = frontier(costs, losses, unit=1)
    target = (f.at_most(f.min_cost).loss + f.at_most(f.max_cost).loss) / 2
    got = f.cheapest(target)
    assert got.loss <= target
    assert f.at_most(got.cost - 1).loss > target if got.cost > f.min_cost else True


def test_pareto_points_trade_cost_for_loss():
    costs, losses = _instance(2, layers=8)
    points = frontier(costs, losses).pareto(6)
    assert len(points) >= 3
    assert [p.cost for p in points] == sorted(p.cost for p in points)
    assert all(a.loss >= b.loss for a, b in zip(points, points[1:], strict=False))


def test_errors_name_the_problem():
    f = frontier([[10, 20]], [[1.0, 0.5]])
    with pytest.raises(LowbitError, match="below the cheapest plan"):
        f.at_most(9)
    with pytest.raises(LowbitError, match="least reachable is 0.5"):
        f.cheapest(0.1)
    with pytest.raises(LowbitError, match="2 costs for 1 losses"):
        frontier([[1, 2]], [[1.0]])
    with pytest.raises(LowbitError, match="non-negative integers"):
        frontier([[1.5]], [[1.0]])
    with pytest.raises(LowbitError, match="finite"):
        frontier([[1]], [[float("nan")]])
