"""SmoothQuant scales: invariance of the float model, W8A8 error with outlier channels, input checks."""

import pytest
import torch
from torch import nn

from lowbit.algorithms.smoothquant import (
    fake_quant_error,
    fold_into_linear_rows,
    fold_into_norm,
    scale_columns,
    search_alpha,
    smooth_scales,
)
from lowbit.core import LowbitError, NonFiniteError, PerChannel, PerToken, QuantSpec

ACT = QuantSpec("uint8", False, PerToken(), "float32")  # what QDynamicLinear's kernels do per token
WEIGHT = QuantSpec("int8", True, PerChannel(0), "float32")


def _outlier_acts(tokens=256, channels=128, seed=0):
    """Activations ``(tokens, channels)`` with 4 channels 50-100x larger, and two weights sharing them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    idx = [channels * i // 128 for i in (5, 17, 60, 99)]
    x[:, idx] *= torch.tensor([50.0, 70.0, 85.0, 100.0])
    ws = [torch.randn(64, channels, generator=g) * 0.05, torch.randn(32, channels, generator=g) * 0.05]
    return x, ws


def test_scales_follow_the_formula():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([[1.0, -4.0, 2.0, 0.0], [0.5, 1.0, -1.0, 0.0]])
    s = smooth_scales(a, [w], 0.5)
    # sqrt(4 / 1), sqrt(1 / 4); zero activation and zero weight column -> 1
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert s.dtype == torch.float32
    # max over every weight sharing the input; alpha = 1 gives the activation range itself
    s2 = smooth_scales(a, [w, torch.full((3, 4), 8.0)], 1.0)
    torch.testing.assert_close(s2, torch.tensor([4.0, 1.0, 1.0, 9.0]))
    tiny = smooth_scales(torch.tensor([1e-12]), [torch.ones(2, 1)], 1.0, min_scale=1e-5)
    assert float(tiny) == pytest.approx(1e-5)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_smoothing_keeps_float_outputs(norm):
    torch.manual_seed(0)
    dim = 48
    ln = nn.RMSNorm(dim) if norm == "rmsnorm" else nn.LayerNorm(dim)
    block = nn.ModuleDict({"norm": ln, "q": nn.Linear(dim, 24), "k": nn.Linear(dim, 16, bias=False)}).double()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2.0)
        if getattr(block.norm, "bias", None) is not None:
            block.norm.bias.normal_()
    x, _ = _outlier_acts(64, dim)
    x = x.double()

    @torch.no_grad()
    def run():
        h = block.norm(x)
        return torch.cat([block.q(h), block.k(h)], -1), h

    ref, h = run()
    s = smooth_scales(h.abs().amax(0), [block.q.weight, block.k.weight], 0.5)
    with torch.no_grad():
        w, b = fold_into_norm(block.norm.weight, getattr(block.norm, "bias", None), s)
        block.norm.weight.copy_(w)
        if b is not None:
            block.norm.bias.copy_(b)
        for lin in (block.q, block.k):
            lin.weight.copy_(scale_columns(lin.weight, s))
        out, _ = run()
    # measured max abs diff: 4.4e-16 (rmsnorm), 8.9e-16 (layernorm) on outputs up to ~3
    assert float((out - ref).abs().max()) < 1e-12


def test_fold_into_producing_linear_keeps_outputs():
    torch.manual_seed(0)
    up, down = nn.Linear(20, 40).double(), nn.Linear(40, 12).double()
    x = torch.randn(8, 20, dtype=torch.float64)
    with torch.no_grad():
        ref = down(up(x))
        s = smooth_scales(up(x).abs().amax(0), [down.weight], 0.7)
        w, b = fold_into_linear_rows(up.weight, up.bias, s)
        up.weight.copy_(w)
        up.bias.copy_(b)
        down.weight.copy_(scale_columns(down.weight, s))
        # measured max abs diff: 3.3e-16
        assert float((down(up(x)) - ref).abs().max()) < 1e-12


def test_smoothing_cuts_w8a8_error_with_outlier_channels():
    x, ws = _outlier_acts()
    err = fake_quant_error(ACT, WEIGHT)
    plain = err(x, ws)
    s = smooth_scales(x.abs().amax(0), ws, 0.5)
    smoothed = err(x / s, [scale_columns(w, s) for w in ws])
    # measured MSE: plain 3.14e-2, alpha=0.5 2.69e-3 (ratio 11.7); search picks 0.45 (2.59e-3)
    assert plain / smoothed > 5
    alpha, s_best = search_alpha(x, ws, err)
    best = err(x / s_best, [scale_columns(w, s_best) for w in ws])
    assert 0.0 <= alpha <= 1.0 and best <= smoothed


def test_search_alpha_is_pure_and_first_minimum_wins():
    x, ws = _outlier_acts(32, 16)
    x0, w0 = x.clone(), [w.clone() for w in ws]
    seen = []

    def const_error(xs, wss):
        seen.append(xs.shape)
        return 1.0

    alpha, s = search_alpha(x, ws, const_error, alphas=(0.3, 0.6))
    assert alpha == 0.3 and len(seen) == 2
    torch.testing.assert_close(s, smooth_scales(x.abs().amax(0), ws, 0.3))
    assert torch.equal(x, x0) and all(torch.equal(a, b) for a, b in zip(ws, w0, strict=True))
    with pytest.raises(NonFiniteError, match="alpha=0.3"):
        search_alpha(x, ws, lambda xs, wss: float("nan"), alphas=(0.3,))
    with pytest.raises(LowbitError, match="at least one alpha"):
        search_alpha(x, ws, const_error, alphas=())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")], ids=["negative", "above-one", "nan"])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(LowbitError, match="alpha must be in"):
        smooth_scales(torch.ones(4), [torch.ones(2, 4)], alpha)


def test_non_finite_inputs_raise():
    with pytest.raises(NonFiniteError, match="act_absmax"):
        smooth_scales(torch.tensor([1.0, float("nan")]), [torch.ones(2, 2)])
    with pytest.raises(NonFiniteError, match=r"weights\[1\]"):
        smooth_scales(torch.ones(2), [torch.ones(2, 2), torch.tensor([[1.0, float("inf")]])])
    with pytest.raises(NonFiniteError, match="x"):
        search_alpha(torch.full((2, 2), float("nan")), [torch.ones(2, 2)], lambda a, b: 0.0)


def test_shape_mismatches_name_the_shapes():
    with pytest.raises(LowbitError, match=r"weights\[0\] has shape \(8, 12\); expected \(out, 10\)"):
        smooth_scales(torch.ones(10), [torch.ones(8, 12)])
    with pytest.raises(LowbitError, match=r"1-d \(in,\), got shape \(2, 5\)"):
        smooth_scales(torch.ones(2, 5), [torch.ones(3, 5)])
    with pytest.raises(LowbitError, match="at least one weight"):
        smooth_scales(torch.ones(5), [])
    with pytest.raises(LowbitError, match="negative"):
        smooth_scales(-torch.ones(5), [torch.ones(3, 5)])
    with pytest.raises(LowbitError, match=r"scales shape \(4,\) != \(6,\) of weight \(3, 6\)"):
        scale_columns(torch.ones(3, 6), torch.ones(4))
    with pytest.raises(LowbitError, match=r"norm weight \(5,\)"):
        fold_into_norm(torch.ones(5), None, torch.ones(4))
    with pytest.raises(LowbitError, match=r"bias \(4,\)"):
        fold_into_norm(torch.ones(5), torch.ones(4), torch.ones(5))
    with pytest.raises(LowbitError, match=r"producing weight \(5, 3\)"):
        fold_into_linear_rows(torch.ones(5, 3), None, torch.ones(3))
    with pytest.raises(LowbitError, match="positive"):
        scale_columns(torch.ones(3, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(LowbitError, match=r"x shape \(4, 3\)"):
        search_alpha(torch.ones(4, 3), [torch.ones(2, 5)], lambda a, b: 0.0)
