"""Invariance: hypothesis fuzzing of choose_qparams / quantize / dequantize over every format and layout.

Shapes have 1-3 dims of 1..70; granularities include groups that do not divide the dimension; values
include float32 extremes (+-3e38), denormals (1e-40), zeros, constants and mixed signs.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from coreutil import expand
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lowbit.core import (
    FORMATS,
    LowbitError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)
from lowbit.core.spec import SCALE_DTYPES, qparam_shape

# LOWBIT_FUZZ_EXAMPLES=3000 for a long local run (passes at 3000; the default keeps the suite fast)
FUZZ = settings(
    max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
EXTREME, DENORMAL = 3e38, 1e-40
VALUE_KINDS = ["normal", "wide", "mixed", "extreme", "denormal", "zeros", "constant", "positive", "negative"]


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    gran = draw(
        st.sampled_from(
            [PerTensor(), PerToken(), PerChannel(axis)]
            + [PerGroup(g, axis) for g in (1, 3, 7, 16, 32, 64, 100)]  # most do not divide the dim
        )
    )
    return shape, gran


@st.composite
def specs(draw):
    name = draw(st.sampled_from(sorted(FORMATS)))
    fmt = FORMATS[name]
    symmetric = fmt.kind != "int" or (name != "uint1" and draw(st.booleans()))  # uint1: no symmetric room
    return QuantSpec(
        name,
        symmetric=symmetric,
        scale_dtype=draw(st.sampled_from(SCALE_DTYPES)),
        clip_ratio=draw(st.sampled_from([1.0, 1.0, 0.9, 0.5])),
    )


def _values(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g)
    if kind == "normal":
        return r
    if kind == "wide":  # magnitudes from 1e-30 to 1e30 in one tensor
        return r * torch.pow(10.0, torch.randint(-30, 31, shape, generator=g).float())
    if kind == "extreme":
        return (r * EXTREME / 4).clamp(-EXTREME, EXTREME)
    if kind == "denormal":
        return r * DENORMAL
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, [0.0, -2.5, EXTREME, DENORMAL, 7e-3][seed % 5])
    if kind in ("positive", "negative"):
        return r.abs() + 1 if kind == "positive" else -r.abs() - 1
    pool = torch.tensor([0.0, EXTREME, -EXTREME, DENORMAL, -DENORMAL, 1.0, -1.0, 0.1])  # mixed
    pick = torch.randint(0, pool.numel() + 1, shape, generator=g)
    return torch.where(pick < pool.numel(), pool[pick.clamp(max=pool.numel() - 1)], r)


def _expand(p, x, spec):
    return expand(p, tuple(x.shape), spec.block_size(tuple(x.shape)))


def _check_codes(codes, scale, zp, x, spec):
    fmt = spec.fmt
    assert codes.shape == x.shape and codes.dtype == fmt.torch_dtype
    if fmt.kind == "int":
        assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
        assert zp.dtype == fmt.torch_dtype and zp.min() >= fmt.qmin and zp.max() <= fmt.qmax
    elif fmt.kind == "codebook":
        assert zp is None and int(codes.max()) < len(fmt.levels)
    else:
        assert zp is None and codes.float().abs().max() <= fmt.float_max


def _check_int_error(x, out, codes, scale, zp, spec):
    """|x - x'| <= scale / 2 per element (plus float32 rounding) wherever the code was not clamped."""
    fmt = spec.fmt
    s = _expand(scale.double(), x, spec)
    err = (x.double() - out.double()).abs()
    bound = s * 0.5 * (1 + 2.0**-20) + x.double().abs() * 2.0**-22 + 1e-44
    inside = (codes > fmt.qmin) & (codes < fmt.qmax)
    assert (err <= bound)[inside].all()
    # nothing is really clipped, unless the step needed is past float32 (uint1 on -3e38..3e38)
    if spec.clip_ratio == 1.0 and spec.scale_dtype == "float32" and (scale < torch.finfo().max).all():
        assert (err <= bound).all()


@FUZZ
@given(layouts(), specs(), st.sampled_from(VALUE_KINDS), st.integers(0, 2**31 - 1))
# found by the fuzzer: int2/uint1 grids on +-3e38 overflowed to -inf before dequantize saturated
@example(((4,), PerTensor()), QuantSpec("int2", symmetric=False), "mixed", 0)
@example(((2, 2), PerTensor()), QuantSpec("uint1", symmetric=False), "mixed", 0)
@example(((3, 70), PerGroup(32)), QuantSpec("int4", symmetric=False, scale_dtype="bfloat16"), "extreme", 1)
def test_fuzz_invariants(layout, spec, kind, seed):
    shape, gran = layout
    spec = QuantSpec.from_dict({**spec.to_dict(), "granularity": {"kind": gran.kind, **vars(gran)}})
    x = _values(kind, shape, seed)
    try:
        scale, zp = choose_qparams(x, spec, name="fuzz")
    except LowbitError as e:  # a scale past float16's (bfloat16's) largest value is refused
        wide, _ = choose_qparams(x, replace(spec, scale_dtype="float32"))
        assert "overflows" in str(e) and wide.max() > torch.finfo(spec.torch_scale_dtype).max
        return
    pshape = qparam_shape(shape, spec.block_size(shape))
    assert tuple(scale.shape) == pshape and scale.dtype == spec.torch_scale_dtype
    assert torch.isfinite(scale).all() and (scale > 0).all()
    codes = quantize(x, scale, zp, spec, name="fuzz")
    _check_codes(codes, scale, zp, x, spec)
    out = dequantize(codes, scale, zp, spec)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(fake_quantize(x, spec, scale, zp), out)
    if spec.fmt.kind == "int":
        _check_int_error(x, out, codes, scale, zp, spec)
        assert torch.equal(quantize(out, scale, zp, spec), codes)  # idempotent
    elif spec.fmt.kind == "codebook":
        assert torch.equal(quantize(out, scale, zp, spec), codes)


CONSTANTS = [0.0, 1.0, -2.5, 0.1, -7e-3, 3e38, -3e38, 1.5e-38, 1e-40, -1e-40]
# fp16/bf16 are plain casts (scale fixed at 1): a constant comes back exactly only if the dtype holds it.
CONSTANT_FORMATS = sorted(n for n, f in FORMATS.items() if not (f.kind == "float" and f.bits == 16))


@FUZZ
@given(layouts(), st.sampled_from(CONSTANT_FORMATS), st.booleans(), st.integers(0, 2**31 - 1))
@example(((1,), PerTensor()), "binary", True, 4)  # seed 4: an all-zero binary block: +-tiny, not +-1
def test_fuzz_constant_blocks_exact(layout, name, symmetric, seed):
    """Every block constant (its own value): exact round trip while |c| is a normal float32.

    Scales are clamped to the smallest normal, so a denormal constant comes back within tiny / 2 (as 0);
    ``binary`` has no zero level, so an all-zero block comes back as +-tiny (both documented).
    """
    shape, gran = layout
    fmt = FORMATS[name]
    symmetric = fmt.kind != "int" or name != "uint1" and symmetric
    spec = QuantSpec(name, symmetric=symmetric, granularity=gran)
    block = spec.block_size(shape)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(CONSTANTS), qparam_shape(shape, block), generator=g)
    x = expand(torch.tensor(CONSTANTS)[pick], shape, block)
    scale, zp = choose_qparams(x, spec)
    out = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    tiny = torch.finfo(torch.float32).tiny
    normal = x.abs() >= tiny
    assert torch.equal(out[normal], x[normal])
    zero, denormal = x == 0, (x != 0) & ~normal
    if name == "binary":  # +-1 times a scale of tiny
        assert (out.abs() == tiny)[zero | denormal].all()
    else:
        assert (out[zero] == 0).all()
        assert ((out - x).abs() <= tiny / 2)[denormal].all()
