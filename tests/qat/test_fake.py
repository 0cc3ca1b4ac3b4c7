"""FakeQuantizer: forward values equal lowbit.core.primitives' quantize -> dequantize bit for bit, and the
gradients (straight-through to the input, LSQ step size, LSQ+ offset, PACT clip) equal hand-computed ones.
The step size is learned in the log domain (``scale = exp(log_scale)``): gradients to ``log_scale`` are
``scale`` times the formulas for ``scale``."""

import math

import pytest
import torch

from lowbit import LowbitError, NonFiniteError
from lowbit.core.primitives import dequantize, quantize
from lowbit.core.spec import PerChannel, PerTensor, QuantSpec
from lowbit.qat import FakeQuantizer, grad_scale, round_ste

# (format, symmetric): asymmetric with a zero point, symmetric, ternary, binary
FORMATS = [
    ("uint4", False),
    ("uint8", False),
    ("int4", True),
    ("int8", True),
    ("ternary", True),
    ("binary", True),
]
FORMAT_IDS = ["uint4-zp", "uint8-zp", "int4", "int8", "ternary", "binary"]
SHAPES = {"per-tensor": (), "per-row": (64, 1)}


def _fq(fmt, symmetric, mode, shape, seed=0):
    """A FakeQuantizer whose range covers about [-2, 2] (so a 3-sigma input is partly clamped), with
    random per-row scales and, for asymmetric formats, zero points near mid-range."""
    spec = QuantSpec(fmt, symmetric, PerTensor(), "float32")
    fq = FakeQuantizer(spec, mode, shape, "t")
    g = torch.Generator().manual_seed(seed)
    half = max(1, (fq.qmax - fq.qmin) // 2)
    scale = (torch.rand(shape, generator=g) + 0.5) * 2.0 / half
    zp = None
    if not symmetric:
        zp = torch.randint(half - half // 2, half + half // 2 + 1, shape, generator=g).to(torch.uint8)
    fq.set_qparams(scale, zp)
    return fq


def _x(seed=1, rows=64, cols=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 3


def _reference(fq, x):
    """quantize -> dequantize of ``x`` (rows, cols) with ``fq``'s qparams, through lowbit.core.primitives."""
    scale, zp = fq.qparams()
    granularity = PerChannel(0) if scale.dim() else PerTensor()
    spec = QuantSpec(fq.spec.format, fq.spec.symmetric, granularity, "float32")
    shape = (x.shape[0], 1) if scale.dim() else (1, 1)
    scale = scale.reshape(shape)
    if zp is None and spec.fmt.kind == "int":
        zp = torch.zeros(shape, dtype=spec.fmt.torch_dtype)
    zp = zp.reshape(shape) if zp is not None else None
    return dequantize(quantize(x, scale, zp, spec), scale, zp, spec)


@pytest.mark.parametrize("mode", ["lsq+", "lsq", "fixed"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("fmt", "symmetric"), FORMATS, ids=FORMAT_IDS)
def test_forward_equals_quantize_dequantize(fmt, symmetric, shape, mode):
    """Exact equality with the core primitives, learned modes included (the LSQ gradient scaling of the
    step size must not change its forward value)."""
    fq = _fq(fmt, symmetric, mode, shape)
    x = _x()
    out = fq(x)
    assert torch.equal(out, _reference(fq, x))
    assert fmt == "binary" or (out.abs() < (x.abs() - 1e-3)).any()  # some inputs were clamped


def test_pact_forward_equals_uint_with_zero_point_zero():
    fq = _fq("uint4", False, "pact", ())
    with torch.no_grad():
        fq.zero_point.zero_()
    x = _x()
    assert torch.equal(fq(x), _reference(fq, x))


def test_grad_scale_is_the_identity_in_the_forward():
    """Bit for bit, for scales of any size (``(x - x*g) + x*g`` is not: it moved ~1-10% of float32
    values by one ulp, which broke the equality above)."""
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(10_000, generator=g) * 4 + 1e-4).requires_grad_()
    for factor in (0.5, 0.1, 0.01, 1 / math.sqrt(64 * 7)):
        out = grad_scale(s, factor)
        assert torch.equal(out, s)
        (grad,) = torch.autograd.grad(out.sum(), s)
        assert torch.equal(grad, torch.full_like(s, factor))


def test_round_ste_rounds_half_to_even_with_identity_gradient():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.4, 0.5, 1.5, 2.5, 2.6], requires_grad=True)
    out = round_ste(x)
    assert out.tolist() == [-2.0, -2.0, -0.0, 0.0, 0.0, 2.0, 2.0, 3.0]
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _unclamped(fq, x):
    """Codes before clamping (int formats) or ``x / s`` (binary), as the forward computes them."""
    scale, zp = fq.qparams()
    v = x / scale
    if fq.spec.fmt.name == "binary":
        return v
    return torch.round(v) + (zp.float() if zp is not None else 0.0)


def _inside(fq, x):
    u = _unclamped(fq, x)
    if fq.spec.fmt.name == "binary":
        return u.abs() <= 1
    return (u >= fq.qmin) & (u <= fq.qmax)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("fmt", "symmetric"), FORMATS, ids=FORMAT_IDS)
def test_ste_gradient_is_one_inside_and_zero_where_clamped(fmt, symmetric, shape):
    fq = _fq(fmt, symmetric, "lsq+", shape)
    x = _x().requires_grad_()
    fq(x).sum().backward()
    inside = _inside(fq, x.detach())
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, inside.float())


def _lsq_scale_grad(fq, x, w):
    """d(sum(w * fq(x)))/d scale by hand: ``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z``
    outside (binary: ``sign - x/s`` inside, ``sign`` outside), times ``1 / sqrt(n * qmax)``; summed per
    scale, in float64. (The gradient to ``log_scale`` is ``s`` times this.)"""
    scale, zp = fq.qparams()
    v = x.double() / scale.double()
    if fq.spec.fmt.name == "binary":
        sign = torch.where(v > 0, 1.0, -1.0).double()
        per = torch.where(v.abs() <= 1, sign - v, sign)
    else:
        z = zp.double() if zp is not None else 0.0
        r = torch.round(x / scale).double()  # rounded as the float32 forward rounds it
        per = torch.where(r + z < fq.qmin, fq.qmin - z, torch.where(r + z > fq.qmax, fq.qmax - z, r - v))
    n = x.numel() // scale.numel()
    total = (w.double() * per).sum() if scale.dim() == 0 else (w.double() * per).sum(1, keepdim=True)
    return total / math.sqrt(n * fq.qmax)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("fmt", "symmetric"), FORMATS, ids=FORMAT_IDS)
def test_lsq_scale_gradient_matches_the_formula(fmt, symmetric, shape):
    fq = _fq(fmt, symmetric, "lsq", shape)
    x = _x()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (fq(x) * w).sum().backward()
    scale, _ = fq.qparams()
    expected = scale.double() * _lsq_scale_grad(fq, x, w).reshape(scale.shape)  # chain rule: ds = s dlog s
    # float32 autograd sums of 40..2560 terms vs float64: measured <= 4.9e-7 (gradients 0.0004 .. 3.3)
    torch.testing.assert_close(fq.log_scale.grad.double(), expected, rtol=0, atol=2e-6)
    assert fq.log_scale.grad.abs().min() > 0


def test_lsq_plus_learns_the_zero_point_and_lsq_does_not():
    """LSQ+: ``d x' / d z`` is 0 inside the range and ``-s`` where clamped (``z`` is rounded with a
    straight-through gradient and subtracted again); LSQ keeps ``z`` fixed."""
    x = _x()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    plus = _fq("uint4", False, "lsq+", (64, 1))
    (plus(x) * w).sum().backward()
    scale, _ = plus.qparams()
    outside = ~_inside(plus, x)
    expected = -(scale.double() * (w.double() * outside).sum(1, keepdim=True))
    assert outside.any(1).all()
    # float32 sums vs float64: measured <= 4.3e-7 (gradients 0.02 .. 2)
    torch.testing.assert_close(plus.zero_point.grad.double(), expected, rtol=0, atol=5e-6)
    lsq = _fq("uint4", False, "lsq", (64, 1))
    (lsq(x) * w).sum().backward()
    assert not lsq.zero_point.requires_grad and lsq.zero_point.grad is None
    assert lsq.log_scale.grad is not None


def test_pact_gradient_to_the_clip_comes_from_inputs_above_it():
    """PACT (uint4, alpha = s * qmax): ``d sum(x') / d s = qmax * #{x > alpha} / sqrt(n * qmax)``, so
    ``d sum(x') / d log_scale`` is ``s`` times that; the input gradient is 1 on (0, alpha), 0 below 0 and
    above alpha."""
    fq = _fq("uint4", False, "pact", ())
    with torch.no_grad():
        fq.zero_point.zero_()
    x = _x().requires_grad_()
    fq(x).sum().backward()
    scale, _ = fq.qparams()
    alpha = float(scale) * fq.qmax
    above = int((x.detach() > alpha).sum())
    assert 0 < above < x.numel() // 2
    expected = float(scale) * fq.qmax * above / math.sqrt(x.numel() * fq.qmax)
    # float32 sum of `above` equal terms, times s: measured relative error 7.6e-9
    assert math.isclose(float(fq.log_scale.grad), expected, rel_tol=1e-6)
    inside = (x.detach() > 0) & (x.detach() < alpha)
    assert torch.equal(x.grad, inside.float())
    assert fq.zero_point.grad is None
    fq.log_scale.grad = None
    fq((x.detach().clamp(max=alpha * 0.9))).sum().backward()
    assert float(fq.log_scale.grad) == 0.0  # nothing above the clip: no gradient to it


def test_fixed_mode_learns_nothing():
    fq = _fq("uint4", False, "fixed", (64, 1))
    assert not fq.log_scale.requires_grad and not fq.zero_point.requires_grad
    assert not fq.scale.requires_grad
    x = _x().requires_grad_()
    fq(x).sum().backward()
    assert fq.log_scale.grad is None and fq.zero_point.grad is None and x.grad is not None


def test_qparams_are_deployable():
    """``qparams()``: float32 scale, zero point rounded and clamped into the code dtype."""
    fq = _fq("uint4", False, "lsq+", (6, 1))
    with torch.no_grad():
        fq.zero_point.copy_(torch.tensor([-3.0, 2.4, 2.6, 7.5, 8.5, 30.0]).reshape(6, 1))
    scale, zp = fq.qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.uint8
    assert zp.reshape(-1).tolist() == [0, 2, 3, 8, 8, 15]


def test_bad_use_is_named():
    spec = QuantSpec("uint4", False, PerTensor(), "float32")
    with pytest.raises(LowbitError, match="layer.input: unknown learning mode 'adam'"):
        FakeQuantizer(spec, "adam", (), "layer.input")
    with pytest.raises(LowbitError, match="layer.input: fake quantization supports integer formats and bin"):
        FakeQuantizer(QuantSpec("fp8_e4m3"), "lsq", (), "layer.input")
    fq = FakeQuantizer(spec, "lsq+", (), "layer.input")
    with pytest.raises(LowbitError, match="layer.input: fake quantizer used before its qparams were set"):
        fq(torch.randn(3))
    fq.set_qparams(torch.tensor(0.1), torch.tensor(3))
    fq.check_finite()


@pytest.mark.parametrize(
    ("log_scale", "match"),
    [
        (float("nan"), "scale became nan"),
        (float("inf"), "scale became inf"),
        (100.0, "scale became inf"),  # exp overflows float32
        (-200.0, r"scale became 0 \(<= 0\)"),  # exp underflows: the only way to a scale <= 0
        (float("-inf"), r"scale became 0 \(<= 0\)"),
    ],
    ids=["nan", "inf", "overflow", "underflow", "-inf"],
)
def test_a_broken_scale_is_named(log_scale, match):
    fq = FakeQuantizer(QuantSpec("uint4", False, PerTensor(), "float32"), "lsq+", (), "layer.input")
    fq.set_qparams(torch.tensor(0.1), torch.tensor(3))
    with torch.no_grad():
        fq.log_scale.fill_(log_scale)
    with pytest.raises(NonFiniteError, match="layer.input: " + match):
        fq.check_finite()
    with pytest.raises(NonFiniteError, match="layer.input: " + match):
        fq.qparams()  # what convert deploys


def test_zero_point_that_is_not_finite_is_named():
    fq = _fq("uint4", False, "lsq+", ())
    with torch.no_grad():
        fq.zero_point.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="t: zero_point became inf"):
        fq.check_finite()


def test_scale_is_exp_of_the_learned_log_scale():
    """``log_scale`` is the parameter; ``scale`` a read-only view ``exp(log_scale)``: differentiable but not
    a leaf (no ``.grad``), and in-place edits of it change nothing."""
    fq = _fq("int4", True, "lsq", (64, 1))
    assert [n for n, _ in fq.named_parameters()] == ["log_scale"]
    assert "scale" not in dict(fq.named_buffers()) and "log_scale" in fq.state_dict()
    assert torch.equal(fq.scale, torch.exp(fq.log_scale))
    assert fq.scale.requires_grad and not fq.scale.is_leaf
    before = fq.scale.detach().clone()
    with torch.no_grad():
        fq.scale.mul_(2.0)
        fq.scale[0] = float("nan")
    assert torch.equal(fq.scale, before)
    with pytest.raises(AttributeError):
        fq.scale = torch.ones(64, 1)
    (fq(_x()) * 1.0).sum().backward()
    assert fq.log_scale.grad is not None and fq.log_scale.grad.shape == (64, 1)


def test_set_qparams_stores_the_log_of_the_scale():
    """``scale`` comes back within a few ulps (exp(log(s)) in float32: measured max 3 ulps, relative
    error 2.7e-7, 1666 of 10,000 scales in (0, 4] not exact); ``qparams()`` returns exactly what the
    forward uses."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(10_000, 1, generator=g) * 4 + 1e-6
    fq = FakeQuantizer(QuantSpec("int8", True, PerTensor(), "float32"), "lsq", (10_000, 1), "t")
    fq.set_qparams(scale, None)
    assert torch.equal(fq.log_scale.detach(), torch.log(scale))
    torch.testing.assert_close(fq.scale.detach(), scale, rtol=1e-6, atol=0)
    got, zp = fq.qparams()
    assert zp is None and got.dtype == torch.float32 and torch.equal(got, fq.scale.detach())
    x = torch.randn(10_000, 8, generator=g)
    assert torch.equal(fq(x), _reference(fq, x))


def test_adam_at_a_high_learning_rate_keeps_the_scale_positive():
    """Inputs far above the range: ``sum(fq(x)) = n * qmax * s``, so every step's gradient pushes the scale
    down. Adam moves a parameter by about lr per step whatever its gradient: a raw step size of 0.02 at lr
    1e-2 is negative after 3 steps (shown below). In the log domain each step moves ``log_scale`` by at
    most about lr (less as the gradient ``s * n * qmax / sqrt(n * qmax)`` shrinks with ``s``): 500 steps
    shrink the scale a lot, and it stays positive and finite."""
    x = torch.full((256,), 10.0)
    raw = torch.tensor(0.02, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (raw * x.numel() * 7).backward()  # d sum(fq(x)) / d s of a raw step size, clamped at qmax 7
        opt.step()
    assert float(raw.detach()) < 0
    fq = FakeQuantizer(QuantSpec("int4", True, PerTensor(), "float32"), "lsq", (), "t")
    fq.set_qparams(torch.tensor(0.02), None)
    opt = torch.optim.Adam(fq.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        fq(x).sum().backward()
        opt.step()
    fq.check_finite()
    log_scale = float(fq.log_scale.detach())
    # measured: log_scale -3.912 -> -6.393 (scale 0.02 -> 1.7e-3)
    assert math.log(0.02) - 500 * 1e-2 <= log_scale < math.log(0.02) - 2.0
    assert torch.equal(fq(x), torch.full_like(x, 7.0) * fq.scale.detach())
