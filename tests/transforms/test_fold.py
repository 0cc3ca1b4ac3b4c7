"""BatchNorm folding keeps outputs (invariance) and leaves unfoldable BatchNorms alone."""

import pytest
import torch
from torch import nn

from lowbit.algorithms.fold import fold_bn
from lowbit.transforms import conv_bn_pairs, fold_batchnorm_


def _bn(c, seed, affine=True):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine)
    bn.running_mean = torch.randn(c, generator=g)
    bn.running_var = torch.rand(c, generator=g) * 2 + 0.05
    if affine:
        bn.weight.data = torch.randn(c, generator=g)
        bn.bias.data = torch.randn(c, generator=g)
    return bn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 1), nn.ReLU6()),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        _bn(8, 2, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.ReLU(),
        _bn(4, 3),  # not after a conv: stays
    ).eval()


def test_fold_keeps_outputs():
    net = _net()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = net(x)
        pairs = fold_batchnorm_(net)
        after = net(x)
    assert sorted(pairs) == [("0.0", "0.1"), ("1", "2")]
    assert isinstance(net[0][1], nn.Identity) and isinstance(net[2], nn.Identity)
    assert isinstance(net[6], nn.BatchNorm2d)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # measured max diff ~1e-6


def test_fold_bn_formula():
    w, b = torch.randn(4, 2, 3, 3), torch.randn(4)
    mean, var, gamma, beta = torch.randn(4), torch.rand(4) + 0.1, torch.randn(4), torch.randn(4)
    w2, b2 = fold_bn(w, b, mean, var, gamma, beta, 1e-5)
    k = gamma / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(w2, w * k[:, None, None, None])
    torch.testing.assert_close(b2, (b - mean) * k + beta)


def test_no_pairs_in_plain_modules():
    class Net(nn.Module):  # conv and BN not in a Sequential: the data flow is unknown
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    assert conv_bn_pairs(Net()) == []


@pytest.mark.parametrize("c_bn", [5])
def test_mismatched_channels_not_folded(c_bn):
    assert conv_bn_pairs(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(c_bn))) == []
