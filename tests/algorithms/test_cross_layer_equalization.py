"""Cross-layer equalization math: ranges per channel, matched ranges after one step, exact invariance
across ReLU for pointwise, depthwise, grouped and Linear second layers."""

import pytest
import torch
from torch.nn import functional as F

from lowbit import LowbitError
from lowbit.algorithms.equalize import (
    equalization_scales,
    equalize_pair,
    input_ranges,
    output_ranges,
    scale_pair,
    stretch_scales,
)

# (name, channels between the layers, layer-2 groups, layer-2 out channels, kernel); kernel 0 = Linear
CASES = [
    ("pointwise", 8, 1, 6, 1),
    ("depthwise", 8, 8, 8, 3),
    ("grouped", 8, 2, 4, 3),
    ("linear", 8, 1, 5, 0),
]
IDS = [c[0] for c in CASES]


def _layers(c, groups, out, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 1, c)  # channel ranges over three decades: what equalization fixes
    if k == 0:
        w1 = torch.randn(c, 4, generator=g) * spread[:, None]
        w2 = torch.randn(out, c, generator=g)
    else:
        w1 = torch.randn(c, 3, 3, 3, generator=g) * spread[:, None, None, None]
        w2 = torch.randn(out, c // groups, k, k, generator=g)
    return w1, torch.randn(c, generator=g), w2


def _forward(w1, b1, w2, groups, x):
    if w1.dim() == 2:
        return F.relu(x @ w1.T + b1) @ w2.T
    h = F.relu(F.conv2d(x, w1, b1, padding=1))
    return F.conv2d(h, w2, padding=w2.shape[-1] // 2, groups=groups)


def _input(w1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, generator=g) if w1.dim() == 2 else torch.randn(2, 3, 9, 9, generator=g)


@pytest.mark.parametrize("name,c,groups,out,k", CASES, ids=IDS)
def test_input_ranges_match_brute_force(name, c, groups, out, k):
    _, _, w2 = _layers(c, groups, out, k)
    per_group, rows = c // groups, out // groups
    group = [slice(i // per_group * rows, (i // per_group + 1) * rows) for i in range(c)]
    want = torch.stack([w2[group[i], i % per_group].abs().max() for i in range(c)])
    torch.testing.assert_close(input_ranges(w2, groups), want, rtol=0, atol=0)


@pytest.mark.parametrize("name,c,groups,out,k", CASES, ids=IDS)
def test_one_step_matches_ranges_and_keeps_outputs(name, c, groups, out, k):
    w1, b1, w2 = _layers(c, groups, out, k)
    r1, r2 = output_ranges(w1), input_ranges(w2, groups)
    n1, nb1, n2, s = equalize_pair(w1, b1, w2, groups)
    geo = torch.sqrt(r1 * r2)
    torch.testing.assert_close(output_ranges(n1), geo, rtol=1e-6, atol=0)
    torch.testing.assert_close(input_ranges(n2, groups), geo, rtol=1e-6, atol=0)
    assert float(s.max() / s.min()) > 10  # the spread was real
    x = _input(w1)
    ref, out_ = _forward(w1, b1, w2, groups, x), _forward(n1, nb1, n2, groups, x)
    torch.testing.assert_close(out_, ref, rtol=1e-5, atol=1e-5)  # measured: max diff / max |out| < 3e-7


def test_zero_range_channels_keep_scale_one():
    s = equalization_scales(torch.tensor([0.0, 4.0, 2.0]), torch.tensor([3.0, 0.0, 0.5]))
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))


def test_scale_pair_dtype_and_no_bias():
    w1, _, w2 = _layers(8, 8, 8, 3)
    n1, nb1, n2 = scale_pair(w1.half(), None, w2.half(), torch.full((8,), 2.0), groups2=8)
    assert nb1 is None and n1.dtype == n2.dtype == torch.float16
    torch.testing.assert_close(n2.float(), (w2.half() * 2).float())


@pytest.mark.parametrize(
    "r1,r2,match",
    [
        (torch.ones(4), torch.ones(5), "4 output channels but layer 2 reads 5"),
    ],
    ids=["channel-mismatch"],
)
def test_bad_shapes(r1, r2, match):
    with pytest.raises(LowbitError, match=match):
        equalization_scales(r1, r2)


def test_groups_must_divide_out_channels():
    with pytest.raises(LowbitError, match="not divisible by groups=4"):
        input_ranges(torch.randn(6, 2, 3, 3), groups=4)


def test_stretch_scales():
    peak = torch.tensor([6.0, 8.0, 2.0, 0.1, 0.0, float("nan")])
    s = stretch_scales(peak, limit=6.0, headroom=1.5, cap=16.0)
    # at or above limit / headroom: 1; 2 -> 6 / 3; 0.1 -> 40 capped at 16; dead and NaN channels: 1
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 2.0, 16.0, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("headroom,cap", [(0.5, 16.0), (1.5, 0.5)], ids=["headroom", "cap"])
def test_stretch_scales_bad_options(headroom, cap):
    with pytest.raises(LowbitError, match="headroom >= 1 and cap >= 1"):
        stretch_scales(torch.ones(2), headroom=headroom, cap=cap)
