"""Bias correction: the shift it computes equals the measured mean output shift (exact for Linear and
grouped convs without padding), and it rejects shapes that do not fit."""

import pytest
import torch
import torch.nn.functional as F

from lowbit import LowbitError
from lowbit.algorithms.bias_correction import ChannelMean, bias_shift


def _mean_of(x):
    m = ChannelMean()
    for part in x.split(7):
        m.update(part)
    return m.mean()


@pytest.mark.parametrize("shape", [(64, 16), (8, 10, 16)], ids=["2d", "3d"])
def test_linear_shift_equals_mean_output_shift(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) + 3.0
    w, err = torch.randn(5, 16, generator=g, dtype=torch.float64), 0.01 * torch.randn(5, 16, generator=g)
    measured = (F.linear(x, w + err.double()) - F.linear(x, w)).reshape(-1, 5).mean(0)
    torch.testing.assert_close(bias_shift(err, _mean_of(x.float())), measured.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 8], ids=["dense", "grouped", "depthwise"])
def test_conv_shift_equals_mean_output_shift_without_padding(groups):
    g = torch.Generator().manual_seed(1)
    # constant over positions within an image, so every window (edge or not) sees the channel mean
    x = (
        torch.randn(6, 8, 1, 1, generator=g, dtype=torch.float64) + torch.arange(8.0).view(1, 8, 1, 1)
    ).expand(6, 8, 9, 9)
    w = torch.randn(8, 8 // groups, 3, 3, generator=g, dtype=torch.float64)
    err = 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    measured = (F.conv2d(x, w + err, groups=groups) - F.conv2d(x, w, groups=groups)).mean((0, 2, 3))
    got = bias_shift(err, _mean_of(x.float()), groups)
    torch.testing.assert_close(got, measured.float(), rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_empty_mean():
    with pytest.raises(LowbitError, match="does not read 10 input channels"):
        bias_shift(torch.zeros(4, 3), torch.zeros(10))
    with pytest.raises(LowbitError, match="2-d .* or 4-d"):
        bias_shift(torch.zeros(4), torch.zeros(4))
    with pytest.raises(LowbitError, match="no activations observed"):
        ChannelMean().mean()
