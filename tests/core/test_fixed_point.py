"""Fixed-point requantization: multipliers to 2**-31 relative error, rounding exactly floor(acc * M + 1/2)."""

from fractions import Fraction

import pytest
import torch

from lowbit.core import LowbitError
from lowbit.core.fixed_point import quantize_multiplier, requantize


@pytest.mark.parametrize("m", [1e-9, 3.1e-5, 0.0123, 0.5, 0.75, 0.999999999, 1.0, 1.5, 1234.5])
def test_multiplier_relative_error(m):
    m0, t = quantize_multiplier(torch.tensor([m], dtype=torch.float64))
    assert 2**30 <= int(m0) < 2**31
    approx = int(m0) * 2.0 ** -int(t)
    assert abs(approx - m) / m < 2**-31


def test_requantize_is_round_half_up_of_the_fixed_point_product():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=g)
    acc[:6] = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 12345])
    m = torch.rand(4000, generator=g, dtype=torch.float64) * 2.0 ** -torch.randint(
        0, 30, (4000,), generator=g
    )
    m0, t = quantize_multiplier(m.clamp_min(1e-12))
    y = requantize(acc, m0, t, 0, -(2**40), 2**40)
    for a, mm, tt, yy in zip(acc.tolist()[:500], m0.tolist(), t.tolist(), y.tolist(), strict=False):
        exact = Fraction(a * mm, 2**tt) + Fraction(1, 2)
        assert yy == exact.numerator // exact.denominator  # floor


def test_requantize_ties_round_up_and_clamp():
    m0, t = quantize_multiplier(torch.tensor([0.5], dtype=torch.float64))  # exact: 2**30 * 2**-31
    acc = torch.tensor([1, 3, -1, -3, 5])
    assert requantize(acc, m0, t, 0, -128, 127).tolist() == [1, 2, 0, -1, 3]  # x.5 -> up
    assert requantize(torch.tensor([1000, -1000]), m0, t, 10, 0, 255).tolist() == [255, 0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2.0**31])
def test_bad_multipliers(bad):
    with pytest.raises(LowbitError):
        quantize_multiplier(torch.tensor([bad], dtype=torch.float64))


def test_float_accumulators_refused():
    m0, t = quantize_multiplier(torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(LowbitError, match="integer accumulators"):
        requantize(torch.tensor([1.0]), m0, t, 0, 0, 255)
