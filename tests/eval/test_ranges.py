"""Activation ranges: exact min/max, sampled percentiles and histograms, what static layers clip."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core.errors import LowbitError
from lowbit.eval.ranges import BINS, activation_ranges


def test_float_layers_min_max_percentiles_and_histogram():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(64, 16) for _ in range(3)]
    first, second = activation_ranges(model, batches, sample=1000)
    x = torch.cat(batches)
    assert (first.name, first.values) == ("0", x.numel())
    assert (first.low, first.high) == (float(x.min()), float(x.max()))
    assert first.low <= first.p001 < -2.5 and 2.5 < first.p999 <= first.high  # standard normal tails
    assert len(first.hist) == BINS and sum(first.hist) == 1000
    assert second.low >= 0.0  # after the ReLU
    assert first.clipped is None and first.representable is None
    assert activation_ranges(model, batches, sample=1000)[0] == first  # seeded


def test_static_layer_reports_what_it_clips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    calib = torch.rand(32, 16) * 2 - 1
    lowbit.quantize_(model, lowbit.StaticW8A8(observer="minmax"), [calib])
    for x, at_least in ((calib, 0.0), (torch.randn(64, 16) * 3, 0.5)):
        got = activation_ranges(model, [x])[0]
        lo, hi = got.representable  # (qmin - zp) * s, (qmax - zp) * s of the calibrated input
        assert lo < -0.98 and hi > 0.98
        assert got.clipped == pytest.approx(float(((x < lo) | (x > hi)).float().mean()))
        assert at_least <= got.clipped < 0.9


def test_bad_input():
    with pytest.raises(LowbitError, match="no Linear, Conv2d or quantized layer"):
        activation_ranges(nn.ReLU(), [torch.randn(2, 2)])
    with pytest.raises(LowbitError, match="no batch reached a layer"):
        activation_ranges(nn.Linear(2, 2), [])
