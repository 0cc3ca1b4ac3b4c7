"""Edge inputs of the primitive set: empty and 0-d tensors, float64, dtypes it refuses, scale dtype limits,
out-of-range codebook codes."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import (
    FORMATS,
    LowbitError,
    NonFiniteError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    packed_size,
    qparams_from_range,
    quantize,
    unpack,
)
from lowbit.core.codec import decode, encode, stored_bytes

F16_TINY = torch.finfo(torch.float16).tiny
F32_MAX = torch.finfo(torch.float32).max

# (shape, granularity, qparam shape): an empty dimension has 0 blocks where the block steps along it and
# 1 where the block spans it, so per-tensor qparams stay (1, 1).
EMPTY = [
    ((0, 256), PerTensor(), (1, 1)),
    ((0, 256), PerChannel(0), (0, 1)),
    ((0, 256), PerChannel(1), (1, 256)),
    ((0, 256), PerGroup(128), (0, 2)),
    ((0, 256), PerToken(), (0, 1)),
    ((8, 0), PerTensor(), (1, 1)),
    ((8, 0), PerChannel(0), (8, 1)),
    ((8, 0), PerChannel(1), (1, 0)),
    ((8, 0), PerGroup(128), (8, 0)),
    ((8, 0), PerToken(), (8, 1)),
]
EMPTY_IDS = [
    "0x256-tensor", "0x256-channel0", "0x256-channel1", "0x256-group128", "0x256-token",
    "8x0-tensor", "8x0-channel0", "8x0-channel1", "8x0-group128", "8x0-token",
]  # fmt: skip
SPECS = [
    ("int8-sym", dict(format="int8")),
    ("uint4-asym", dict(format="uint4", symmetric=False)),
    ("nf4", dict(format="nf4")),
    ("fp8", dict(format="fp8_e4m3")),
    ("binary", dict(format="binary")),
]


def _entry_points(x, spec, name):
    """``choose_qparams``, ``quantize`` (with qparams of clean data) and ``fake_quantize`` of ``x``."""
    scale, zp = choose_qparams(torch.randn(x.shape), spec)
    return [
        lambda: choose_qparams(x, spec, name=name),
        lambda: quantize(x, scale, zp, spec, name=name),
        lambda: fake_quantize(x, spec, name=name),
    ]


@pytest.mark.parametrize("spec_kw", [s for _, s in SPECS], ids=[i for i, _ in SPECS])
@pytest.mark.parametrize(("shape", "gran", "qshape"), EMPTY, ids=EMPTY_IDS)
def test_empty_tensor_gives_empty_codes(shape, gran, qshape, spec_kw):
    """Empty in, empty out; qparams of the documented shape; an empty block gets scale 1 (as all-zero)."""
    spec = QuantSpec(granularity=gran, **spec_kw)
    x = torch.randn(shape)
    scale, zp = choose_qparams(x, spec, name="empty")
    assert tuple(scale.shape) == qshape and scale.dtype == spec.torch_scale_dtype
    assert zp is None or (tuple(zp.shape) == qshape and zp.dtype == spec.fmt.torch_dtype)
    if spec.fmt.name != "binary":
        assert (scale == 1).all()
    codes = quantize(x, scale, zp, spec, name="empty")
    assert codes.shape == shape and codes.dtype == spec.fmt.torch_dtype
    out = dequantize(codes, scale, zp, spec)
    assert out.shape == shape and out.dtype == torch.float32
    fq = fake_quantize(x.requires_grad_(), spec, name="empty")
    assert fq.shape == shape
    fq.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("gran", [PerTensor(), PerToken()], ids=["tensor", "token"])
@pytest.mark.parametrize("value", [0.75, -3.0, 0.0], ids=str)
def test_scalar_is_one_block(gran, value):
    """A 0-d tensor is one block of one element: 0-d qparams, an exact round trip (constant block)."""
    spec = QuantSpec("int4", symmetric=False, granularity=gran)
    x = torch.tensor(value)
    scale, zp = choose_qparams(x, spec)
    assert scale.shape == () and zp.shape == ()
    codes = quantize(x, scale, zp, spec)
    assert codes.shape == () and dequantize(codes, scale, zp, spec).item() == value
    assert fake_quantize(x, spec).shape == () and fake_quantize(x, spec).item() == value


@pytest.mark.parametrize(
    "gran", [PerChannel(0), PerChannel(1), PerGroup(4)], ids=["channel0", "channel1", "group4"]
)
def test_scalar_refuses_axis_granularity(gran):
    spec = QuantSpec("int8", granularity=gran)
    x = torch.tensor(1.5)
    for call in (lambda: choose_qparams(x, spec), lambda: fake_quantize(x, spec)):
        with pytest.raises(LowbitError, match=r"0-d tensor has no axis.*PerTensor\(\)"):
            call()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int8", granularity=PerChannel(0)),
        QuantSpec("uint4", symmetric=False, granularity=PerGroup(4), scale_dtype="float16"),
        QuantSpec("nf4", granularity=PerGroup(4)),
        QuantSpec("fp8_e4m3", granularity=PerTensor()),
    ],
    ids=["int8", "uint4-g4", "nf4", "fp8"],
)
def test_float64_output_is_the_float32_result(spec):
    """float64 output: computed in float32 (ONNX rule) and cast, so bit-identical to float32's result."""
    x = torch.randn(4, 8, dtype=torch.float64)
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, scale, zp, spec)
    out = dequantize(codes, scale, zp, spec, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, dequantize(codes, scale, zp, spec).double())
    x.requires_grad_()
    fq = fake_quantize(x, spec)
    assert fq.dtype == torch.float64 and torch.equal(fq.detach(), out)
    fq.sum().backward()
    assert x.grad.dtype == torch.float64


def test_float64_output_saturates_like_float32():
    """int2 on +-3e38 reaches half a step past float32's range: float64 output saturates there too."""
    spec = QuantSpec("int2", symmetric=False)
    x = torch.tensor([-3e38, 3e38, 0.0, 1.0])
    scale, zp = choose_qparams(x, spec)
    out = dequantize(quantize(x, scale, zp, spec), scale, zp, spec, dtype=torch.float64)
    assert torch.isfinite(out).all() and out.abs().max() <= F32_MAX


@pytest.mark.parametrize("big", [1e39, -1e300], ids=["1e39", "-1e300"])
def test_float64_beyond_float32_range_is_refused(big):
    spec = QuantSpec("int8", granularity=PerChannel(0))
    x = torch.randn(4, 8, dtype=torch.float64)
    x[1, 2] = big
    for call in _entry_points(x, spec, "model.w"):
        with pytest.raises(LowbitError, match=r"model\.w: 1 of 32 values .*float32's range"):
            call()
    lo = torch.tensor([0.0, -abs(big)], dtype=torch.float64)
    with pytest.raises(LowbitError, match="float32's range"):
        qparams_from_range(lo, torch.ones(2, dtype=torch.float64), spec)


@pytest.mark.parametrize(
    ("fmt", "symmetric", "magnitude"),
    [("int4", True, 1e7), ("uint4", False, 1e7), ("int8", True, 1e7), ("fp8_e4m3", True, 1e8)],
    ids=["int4", "uint4", "int8", "fp8"],
)
def test_float16_scale_overflow_is_refused(fmt, symmetric, magnitude):
    """A scale past float16's 65504 (max |x| / 448 for fp8_e4m3): an error naming the tensor, not a
    saturated scale (which gave a relative error near 1)."""
    x = torch.randn(4, 16) * magnitude
    spec = QuantSpec(fmt, symmetric, PerGroup(8), scale_dtype="float16")
    for call in (lambda: choose_qparams(x, spec, name="l.w"), lambda: fake_quantize(x, spec, name="l.w")):
        with pytest.raises(LowbitError, match=r"l\.w: scale .* overflows float16.*'float32' or 'bfloat16'"):
            call()
    with pytest.raises(LowbitError, match="overflows float16"):
        qparams_from_range(x.amin(-1), x.amax(-1), spec)
    for sdt in ("bfloat16", "float32"):
        ok = QuantSpec(fmt, symmetric, PerGroup(8), scale_dtype=sdt)
        err = (fake_quantize(x, ok) - x).norm() / x.norm()
        assert err < 0.1  # 4-bit groups of 8: measured 0.05-0.07


@pytest.mark.parametrize("magnitude", [1e-9, 1e-6, 1e-5], ids=str)
@pytest.mark.parametrize(("fmt", "symmetric"), [("int4", True), ("uint4", False)], ids=["int4", "uint4"])
def test_float16_scale_underflow_clamps_to_smallest_normal(magnitude, fmt, symmetric):
    """A block too small for a float16 scale gets float16's smallest normal (a subnormal scale would lose
    precision and saturate codes): each element is off by at most half of it (3.05e-5), a zero block
    stays exact."""
    x = torch.randn(4, 16) * magnitude
    x[3] = 0.0
    spec = QuantSpec(fmt, symmetric, PerGroup(8), scale_dtype="float16")
    scale, zp = choose_qparams(x, spec)
    assert (scale[:3] == F16_TINY).all()
    out = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    assert ((out - x).abs() <= F16_TINY / 2).all() and (out[3] == 0).all()


def test_complex_input_is_refused():
    x = torch.randn(4, 8, dtype=torch.complex64)
    for call in _entry_points(x, QuantSpec("int8"), "c"):
        with pytest.raises(LowbitError, match=r"c: complex64 .*not supported"):
            call()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool], ids=str)
def test_integer_and_bool_input_is_refused(dtype):
    x = (torch.randn(4, 8) * 5).to(dtype)
    for call in _entry_points(x, QuantSpec("int8"), "ids"):
        with pytest.raises(LowbitError, match=r"ids: .* floating-point"):
            call()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64], ids=str)
def test_dequantize_to_a_non_float_dtype_is_refused(dtype):
    spec = QuantSpec("int8")
    codes = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(LowbitError, match=r"floating-point dtype"):
        dequantize(codes, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8), spec, dtype=dtype)


@pytest.mark.parametrize(
    ("fmt", "code"),
    [("nf4", 16), ("nf4", 255), ("log2", 15), ("binary", 2)],
    ids=["nf4-16", "nf4-255", "log2-15", "binary-2"],
)
def test_codebook_code_out_of_range(fmt, code):
    spec = QuantSpec(fmt)
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    codes[1, 2] = code
    n = len(spec.fmt.levels)
    with pytest.raises(LowbitError, match=rf"w\.codes: {fmt} code {code} out of range .*0\.\.{n - 1}"):
        dequantize(codes, torch.ones(1, 1), None, spec, name="w.codes")


def test_non_finite_error_still_first():
    """NaN in float64 input is a NonFiniteError, checked before the float32 range."""
    x = torch.tensor([1.0, float("nan"), 1e39], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="1 of 3"):
        choose_qparams(x, QuantSpec("int8"))


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (3, 0, 5), (0, 0)], ids=["0x8", "8x0", "3x0x5", "0x0"])
@pytest.mark.parametrize("fmt", ["int8", "uint4", "int3", "nf4", "binary", "fp8_e4m3", "bf16"])
def test_empty_codes_pack_and_encode(shape, fmt):
    """Empty codes give empty bytes of the same leading shape, and come back."""
    f = FORMATS[fmt]
    codes = torch.zeros(shape, dtype=f.torch_dtype)
    data = encode(codes, f)
    assert data.shape == (*shape[:-1], stored_bytes(shape[-1], f)) and data.dtype == torch.uint8
    back = decode(data, f, shape[-1])
    assert back.shape == shape and back.dtype == f.torch_dtype
    if f.kind != "float":
        packed = pack(codes.view(torch.uint8) if f.signed else codes, f.bits)
        assert packed.shape == (*shape[:-1], packed_size(shape[-1], f.bits))
        assert unpack(packed, f.bits, shape[-1]).shape == shape


def test_pack_refuses_0d():
    for call in (
        lambda: pack(torch.tensor(3, dtype=torch.uint8), 4),
        lambda: unpack(torch.tensor(3, dtype=torch.uint8), 4, 1),
    ):
        with pytest.raises(LowbitError, match="0-d"):
            call()
