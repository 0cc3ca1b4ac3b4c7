"""Block-AP math (``lowbit.algorithms.blockap``): the trained fake-quantized weight is exactly what lowbit
stores and dequantizes, gradients flow straight through, and the optimisation loop schedules and stops."""

import math

import pytest
import torch

from lowbit import LowbitError
from lowbit.algorithms.blockap import Learned, cosine, fake_quantize_learned, freeze, learnable, optimise
from lowbit.algorithms.rtn import rtn
from lowbit.core.primitives import dequantize, quantize
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec

SPECS = {
    "u3-g16": QuantSpec("uint3", False, PerGroup(16), "float16"),
    "u2-g64-partial": QuantSpec("uint2", False, PerGroup(64), "float16"),  # 40 + 64: last group partial
    "u4-channel-bf16": QuantSpec("uint4", False, PerChannel(0), "bfloat16"),
    "i4-g16-sym": QuantSpec("int4", True, PerGroup(16), "float32"),
    "u8-g32": QuantSpec("uint8", False, PerGroup(32), "float16"),
}


def _moved(spec: QuantSpec, seed: int = 0):
    """A weight, and learnable qparams from its RTN rounding moved off their start (as training does)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 104, generator=g) * 0.2
    qt = rtn(w, spec)
    u, s0, ratio, zp = learnable(w, qt.scale, qt.zero_point, spec)
    u = u + 0.7 * torch.randn(u.shape, generator=g)
    ratio = ratio + 0.2 * torch.randn(ratio.shape, generator=g)
    if zp.requires_grad:
        zp = (zp + 1.5 * torch.randn(zp.shape, generator=g)).requires_grad_()
    return w, qt, Learned(u, s0, ratio, zp)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_fake_quant_is_the_stored_weight_bit_for_bit(spec):
    _, _, p = _moved(spec)
    fake = fake_quantize_learned(p, spec)
    qt = freeze(p, spec)
    assert qt.scale.dtype == spec.torch_scale_dtype and qt.zero_point.dtype == spec.fmt.torch_dtype
    assert int(qt.codes.min()) >= spec.fmt.qmin and int(qt.codes.max()) <= spec.fmt.qmax
    assert torch.equal(fake, dequantize(qt.codes, qt.scale, qt.zero_point, spec))
    # lowbit's quantize with the trained qparams gives the trained codes back
    assert torch.equal(quantize(fake, qt.scale, qt.zero_point, spec), qt.codes)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_step_zero_is_the_initial_rounding(spec):
    w, qt, _ = _moved(spec)
    p = learnable(w, qt.scale, qt.zero_point, spec)  # from the float weight: RTN
    assert torch.equal(fake_quantize_learned(p, spec), qt.dequantize())
    again = freeze(learnable(qt.dequantize(), qt.scale, qt.zero_point, spec), spec)  # from a rounded one
    assert torch.equal(again.codes, qt.codes) and torch.equal(again.scale, qt.scale)
    assert torch.equal(again.zero_point, qt.zero_point)


def test_gradients_are_straight_through():
    spec = SPECS["u3-g16"]
    _, _, p = _moved(spec)
    u, ratio, zp = p.u.requires_grad_(), p.log_ratio.requires_grad_(), p.zero_point
    zp.retain_grad()
    fake = fake_quantize_learned(p, spec)
    fake.sum().backward()
    q = freeze(p, spec)
    z = q.zero_point.float().repeat_interleave(16, dim=1)[:, :104]
    s = q.scale.float().repeat_interleave(16, dim=1)[:, :104]
    raw = torch.round(u.detach()) + z
    inside = (raw >= spec.fmt.qmin) & (raw <= spec.fmt.qmax)
    assert torch.equal(u.grad, torch.where(inside, s, torch.zeros(())))  # dW'/du = s inside, 0 clamped
    assert bool(torch.isfinite(ratio.grad).all()) and float(ratio.grad.abs().sum()) > 0
    assert bool(torch.isfinite(zp.grad).all()) and float(zp.grad.abs().sum()) > 0  # from the clamped ones
    sym = SPECS["i4-g16-sym"]
    zp_sym = _moved(sym)[2].zero_point
    assert not zp_sym.requires_grad and not zp_sym.any()


def test_integer_formats_only():
    with pytest.raises(LowbitError, match="integer formats"):
        learnable(torch.ones(2, 4), torch.ones(2, 1), None, QuantSpec("nf4", True, PerGroup(4)))


def test_optimise_fits_and_follows_a_cosine():
    target = torch.tensor([3.0, -2.0])
    x = torch.zeros(2, requires_grad=True)
    seen = []

    def loss_of(items):
        seen.append(items.tolist())
        return (x - target).pow(2).sum()

    history = optimise([{"params": [x], "lr": 0.5}], loss_of, 8, epochs=20, batch=3)
    assert [len(s) for s in seen[:3]] == [3, 3, 2] and sorted(sum(seen[:3], [])) == list(range(8))
    assert len(history) == 20 and history[-1] < 1e-3 * history[0]
    assert torch.allclose(x.detach(), target, atol=0.05)
    assert cosine(0, 10) == 1.0 and cosine(10, 10) == 0.0 and math.isclose(cosine(5, 10), 0.5)


def test_optimise_stops_on_a_non_finite_loss():
    x = torch.ones(1, requires_grad=True)
    calls = []

    def loss_of(items):
        calls.append(len(items))
        return x.sum() * (float("nan") if len(calls) == 3 else 1.0)

    with pytest.raises(LowbitError, match=r"model.layers.7: training loss is nan at epoch 2, step 3 of 4"):
        optimise([{"params": [x], "lr": 0.1}], loss_of, 4, epochs=2, batch=2, name="model.layers.7")
    with pytest.raises(LowbitError, match="must be positive"):
        optimise([{"params": [x], "lr": 0.1}], loss_of, 4, epochs=0, batch=2)


@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "in-order"])
def test_training_from_gptq_values_starts_at_gptq_codes(act_order):
    """``gptq(return_values=True)``: the values it rounded give its codes back under its qparams."""
    from lowbit.algorithms.gptq import gptq

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 96, generator=g) * 0.2, torch.randn(512, 96, generator=g)
    spec = SPECS["u3-g16"]
    qt, values = gptq(w, 2 * x.T @ x / 512, spec, act_order=act_order, mse_clip=True, return_values=True)
    assert values.shape == w.shape and not torch.equal(values, w) and not torch.equal(values, qt.dequantize())
    again = freeze(learnable(values, qt.scale, qt.zero_point, spec), spec)
    assert torch.equal(again.codes, qt.codes) and torch.equal(again.scale, qt.scale)
    assert torch.equal(gptq(w, 2 * x.T @ x / 512, spec, act_order=act_order, mse_clip=True).codes, qt.codes)
