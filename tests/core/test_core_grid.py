"""Exact: values that lie on a quantization grid come back bit-exactly, for every layout.

Grid values are ``(q - z) * s`` with integer codes ``q`` in ``[qmin, qmax]``, an integer zero point ``z`` and
a scale ``s`` that is a power of two or a float16/bfloat16 value, so ``(q - z) * s`` is exact in float32
and ``x / s`` is exactly ``q - z``.
"""

from __future__ import annotations

import pytest
import torch
from coreutil import LAYOUT_IDS, LAYOUTS, block_corners, expand

from lowbit.core import QuantSpec, choose_qparams, dequantize, fake_quantize, get_format, quantize
from lowbit.core.spec import qparam_shape

INT_FORMATS = ["int8", "uint8", "int4", "uint4", "int3", "int2", "ternary"]
# scale kinds: powers of two, random values of the stored dtype, float32 values with 16 significant bits
SCALES = [
    ("pow2", "float32"),
    ("fp16-values", "float16"),
    ("bf16-values", "bfloat16"),
    ("f32-16bit", "float32"),
]
SCALE_IDS = [s[0] for s in SCALES]


def _scales(shape, kind, g):
    if kind == "pow2":
        return torch.pow(2.0, torch.randint(-12, 8, shape, generator=g).float())
    s = torch.rand(shape, generator=g) * 4 + 1e-3
    if kind == "f32-16bit":  # float32 scales with 16 significant bits: (q - z) * s still fits 24 bits
        return (s.view(torch.int32) & ~0xFF).view(torch.float32)
    return s.to(torch.bfloat16 if kind.startswith("bf16") else torch.float16).float()


def _zero_points(fmt, shape, symmetric, g):
    if symmetric:
        return torch.full(shape, 0 if fmt.qmin < 0 else (fmt.qmax + 1) // 2, dtype=torch.int64)
    return torch.randint(fmt.qmin, fmt.qmax + 1, shape, generator=g)


def _grid(name, shape, gran, symmetric, scale_kind, seed=0):
    """(x, scale, zero_point, codes, spec) with x exactly on the grid."""
    fmt = get_format(name)
    spec = QuantSpec(name, symmetric=symmetric, granularity=gran, scale_dtype=dict(SCALES)[scale_kind])
    block = spec.block_size(shape)
    g = torch.Generator().manual_seed(seed)
    pshape = qparam_shape(shape, block)
    scale = _scales(pshape, scale_kind, g)
    zp = _zero_points(fmt, pshape, symmetric, g)
    z = expand(zp, shape, block)
    lo, hi = fmt.qmin, fmt.qmax
    if symmetric:  # the symmetric range is z +- half
        half = fmt.qmax - z
        lo, hi = z - half, z + half
    codes = lo + (torch.rand(shape, generator=g) * (hi - lo + 1)).floor().long().clamp(max=hi - lo)
    first, last = block_corners(shape, block)  # every block spans its whole range
    codes = torch.where(first, lo, torch.where(last, hi, codes))
    x = ((codes - z).double() * expand(scale, shape, block).double()).float()
    assert torch.equal(x.double(), (codes - z).double() * expand(scale, shape, block).double())
    return x, scale.to(spec.torch_scale_dtype), zp.to(fmt.torch_dtype), codes.to(fmt.torch_dtype), spec


@pytest.mark.parametrize(("layout", "shape", "gran"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("scale_kind", [s[0] for s in SCALES], ids=SCALE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", INT_FORMATS)
def test_on_grid_round_trip_given_qparams(name, symmetric, scale_kind, layout, shape, gran):
    x, scale, zp, codes, spec = _grid(name, shape, gran, symmetric, scale_kind)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.fmt.torch_dtype
    assert torch.equal(q, codes)
    assert torch.equal(dequantize(q, scale, zp, spec), x)
    assert torch.equal(fake_quantize(x, spec, scale, zp), x)


@pytest.mark.parametrize(("layout", "shape", "gran"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("scale_kind", [s[0] for s in SCALES], ids=SCALE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name", INT_FORMATS)
def test_on_grid_choose_qparams_recovers_grid(name, symmetric, scale_kind, layout, shape, gran):
    """Every block spans its full code range, so choose_qparams finds the grid's own scale and zero point."""
    x, scale, zp, codes, spec = _grid(name, shape, gran, symmetric, scale_kind, seed=1)
    s, z = choose_qparams(x, spec)
    assert s.dtype == spec.torch_scale_dtype and z.dtype == spec.fmt.torch_dtype
    assert torch.equal(s, scale)
    assert torch.equal(z, zp)
    q = quantize(x, s, z, spec)
    assert torch.equal(q, codes)
    assert torch.equal(dequantize(q, s, z, spec), x)
    assert torch.equal(fake_quantize(x, spec), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["int8", "uint4"])
def test_on_grid_low_precision_input(name, dtype):
    """Half-precision inputs on the grid come back exactly in their own dtype."""
    x, scale, zp, codes, spec = _grid(name, (4, 100), LAYOUTS[4][2], False, "pow2")
    x16 = x.to(dtype)
    assert torch.equal(x16.float(), x)  # small codes times powers of two fit in 8 mantissa bits
    s, z = choose_qparams(x16, spec)
    out = dequantize(quantize(x16, s, z, spec), s, z, spec, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, x16)
    assert torch.equal(fake_quantize(x16, spec), x16)
