"""equalize_ on small models: pairs found in (nested) Sequentials, exact invariance across ReLU, ReLU6
handling, barriers; StaticW8A8(equalize=True) end to end and the config's version-1 compatibility;
stretch_relu6_: its pairs, float invariance within the calibrated peaks, StaticW8A8 with and without it."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import StaticW8A8, quantize_
from lowbit.algorithms.equalize import input_ranges, output_ranges
from lowbit.core.errors import NonFiniteError
from lowbit.transforms import config_from_dict, fold_batchnorm_
from lowbit.transforms.equalize import equalization_pairs, equalize_, stretch_pairs, stretch_relu6_


def _bn(c, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean = torch.randn(c, generator=g)
    bn.running_var = torch.rand(c, generator=g) * 2 + 0.05
    bn.weight.data = torch.logspace(-1.5, 1, c)[torch.randperm(c, generator=g)]  # wide per-channel spread
    bn.bias.data = torch.randn(c, generator=g)
    return bn


def _block(c_in, c_out, seed, groups=1, k=3, act=nn.ReLU):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, _bn(c_out, seed), act())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(_block(c, c, 7, groups=c), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.body(x)


def _net(act=nn.ReLU):
    """stem 3x3 -> [depthwise -> pointwise] x2 (ReLU or ``act``), residual block, pool, two Linears."""
    torch.manual_seed(0)
    return nn.Sequential(
        _block(3, 8, 1),
        nn.Sequential(_block(8, 8, 2, groups=8, act=act), _block(8, 16, 3, k=1, act=act)),
        _block(16, 16, 4, groups=16, act=act),
        _block(16, 8, 5, k=1),
        Residual(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    ).eval()


PAIRS = [
    ("0.0", "1.0.0"),  # stem -> depthwise, across a nested Sequential
    ("1.0.0", "1.1.0"),  # depthwise -> pointwise
    ("1.1.0", "2.0"),  # pointwise -> depthwise
    ("2.0", "3.0"),
    ("4.body.0.0", "4.body.1"),  # inside the residual's Sequential; the residual itself is a barrier
    ("7", "9"),  # Linear -> ReLU -> Linear
]


def test_pairs_found_in_sequentials():
    net = _net()
    fold_batchnorm_(net)
    assert [(p.first, p.second) for p in equalization_pairs(net)] == PAIRS


def test_unfolded_batchnorm_is_a_barrier():
    assert ("0.0", "1.0.0") not in [(p.first, p.second) for p in equalization_pairs(_net())]


def test_equalize_keeps_outputs_and_balances_ranges():
    net = _net()
    fold_batchnorm_(net)
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        ref = net(x)
        pairs = equalize_(net)
        out = net(x)
    assert len(pairs) == len(PAIRS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # measured max diff 5e-7 (outputs up to 2.3)
    for p in pairs:  # converged: each pair's ranges matched (chains make it iterative)
        a, b = net.get_submodule(p.first), net.get_submodule(p.second)
        r1, r2 = output_ranges(a.weight), input_ranges(b.weight, getattr(b, "groups", 1))
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=0)


@pytest.mark.parametrize("replace,n_pairs,n_relu6", [(False, 3, 3), (True, 6, 0), ({"1.0.2"}, 4, 2)],
                         ids=["skip", "all", "one"])  # fmt: skip
def test_relu6(replace, n_pairs, n_relu6):
    net = _net(act=nn.ReLU6)
    fold_batchnorm_(net)
    pairs = equalize_(net, replace_relu6=replace)
    assert len(pairs) == n_pairs
    assert sum(type(m) is nn.ReLU6 for m in net.modules()) == n_relu6
    assert all(type(net.get_submodule(p.activation)) is nn.ReLU for p in pairs if p.activation)


def test_static_with_equalize_close_to_float():
    net = _net(act=nn.ReLU6)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        ref = net(x)
    s = quantize_(net, StaticW8A8(equalize=True), calib=calib)
    assert len(s.equalized) == 6 and "equalized: 6" in str(s)
    assert set(s.fused) >= {"1.0.2", "1.1.2", "2.2"}  # the ReLU6 made ReLU are fused: nn.Identity now
    assert not any(type(m) in (nn.ReLU, nn.ReLU6) for m in net[1].modules())
    with torch.no_grad():
        out = net(x)
    err = float((out - ref).norm() / ref.norm())
    assert err < 0.05  # measured 0.0055 (0.0042 without equalize)


def test_static_equalize_save_load(tmp_path):
    net = _net(act=nn.ReLU6)
    quantize_(net, StaticW8A8(equalize=True), calib=[torch.randn(4, 3, 10, 10)])
    lowbit.save(net, tmp_path / "net")
    back = lowbit.load(tmp_path / "net", model=_net(act=nn.ReLU6))  # skeleton with ReLU6: fused ones gone
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_static_equalize_without_fusion_leaves_relu6_pairs():
    net = _net(act=nn.ReLU6)
    s = quantize_(net, StaticW8A8(equalize=True, fuse_activations=False), calib=[torch.randn(4, 3, 10, 10)])
    assert len(s.equalized) == 3 and sum(type(m) is nn.ReLU6 for m in net.modules()) == 3


def test_config_versions():
    c = StaticW8A8(equalize=True)
    assert config_from_dict(c.to_dict()) == c and c.version == 5
    old = {k: v for k, v in StaticW8A8().to_dict().items() if k not in ("equalize", "stretch_relu6")}
    assert config_from_dict(old | {"version": 1}).equalize is False  # what a version-1 config ran
    assert config_from_dict(old | {"version": 2}).stretch_relu6 is False  # what a version-2 config ran
    assert config_from_dict(old | {"version": 3}).stretch_relu6 is True


def _relu6_calib(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


def test_stretch_pairs_are_relu6_into_depthwise():
    net = _net(act=nn.ReLU6)
    fold_batchnorm_(net)
    # 1.0.0 -> 1.1.0 and 2.0 -> 3.0 cross a ReLU6 into a pointwise conv; 0.0 -> 1.0.0 crosses a ReLU
    assert [(p.first, p.second, p.activation) for p in stretch_pairs(net)] == [("1.1.0", "2.0", "1.1.2")]


def test_stretch_keeps_float_outputs_and_fills_the_range():
    net = _net(act=nn.ReLU6)
    fold_batchnorm_(net)
    calib = _relu6_calib()
    peak = lambda: torch.stack([net[1][1](net[1][0](net[0](x))) for x in calib]).amax((0, 1, 3, 4))  # noqa: E731
    with torch.no_grad():
        ref, before = [net(x) for x in calib], peak()
        assert len(stretch_relu6_(net, calib)) == 1
        out, after = [net(x) for x in calib], peak()
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    live = before > 0  # dead channels (peak 0) keep factor 1 and stay 0
    assert bool((before[live] < 6).any()) and float((after[live] / before[live]).min()) >= 1 - 1e-6
    # each channel now peaks at 6 / 1.5 unless its factor hit the cap (16) or it already peaked above 4
    expected = torch.where(before < 4, torch.minimum(before * 16, torch.full_like(before, 4.0)), before)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def _quiet_channels_net():
    """1x1 conv (8 channels peaking 2**0 .. 2**-7 times apart) -> ReLU6 -> depthwise 3x3."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8)).eval()
    with torch.no_grad():
        net[0].weight.mul_(2.0 ** -torch.arange(8.0).view(-1, 1, 1, 1) * 3)
        net[0].bias.fill_(0.01)
    return net


def test_static_stretch_lowers_error():
    x = torch.randn(16, 3, 10, 10)
    errs = {}
    for stretch in (False, True):
        net = _quiet_channels_net()
        with torch.no_grad():
            ref = net(x)
        cfg = StaticW8A8(stretch_relu6=stretch, int8_outputs="none")  # the depthwise output stays float
        s = quantize_(net, cfg, calib=iter(_relu6_calib(8)))  # an iterator: read twice
        assert s.stretched == ([("0", "2")] if stretch else [])
        with torch.no_grad():  # relative error per channel, averaged: quiet channels count as loud ones do
            per_channel = lambda t: torch.linalg.vector_norm(t, dim=(0, 2, 3))  # noqa: E731
            errs[stretch] = float((per_channel(net(x) - ref) / per_channel(ref)).mean())
    assert "stretched: 1" in str(s)
    assert errs[True] < 0.5 * errs[False]  # measured 0.0061 vs 0.0256


def test_stretch_nan_calibration_names_the_activation_and_changes_nothing():
    net = _quiet_channels_net()
    before = copy.deepcopy(net.state_dict())
    bad = torch.randn(2, 3, 10, 10)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="observer '1'"):  # the ReLU6, in the stretch pass
        quantize_(net, StaticW8A8(), calib=[bad])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
