"""The one primitive set: ``choose_qparams``, ``quantize``, ``dequantize``, ``fake_quantize``.

``choose_qparams`` reduces each block to its range and calls ``qparams_from_range``, which observers
(``lowbit.observers``) call with the range they calibrated: one qparam rule for both.

Integer formats follow ONNX QuantizeLinear/DequantizeLinear exactly::

    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)      # quantize
    x' = (q - zero_point) * scale                                       # dequantize

computed in float32 with ``scale`` first rounded to ``spec.scale_dtype``; the one difference from ONNX:
``dequantize`` saturates at the output dtype's largest finite value where ONNX would overflow to inf (an
asymmetric grid reaches half a step past its range, e.g. int2 on +-3e38). Float formats store
``cast(x / scale)``; codebook formats store the index of the nearest level of ``x / scale``.

Shapes: ``x`` is any shape; ``scale``/``zero_point`` have ``qparam_shape(x.shape, block)`` (same ndim
as ``x``, see ``lowbit.core.spec``); codes have ``x.shape`` and ``spec.fmt.torch_dtype``.
Blocks that are constant (all elements equal ``c``) get ``scale = |c|`` (1 when ``c == 0``; the smallest
normal for ``binary``, which has no zero level), so they round-trip exactly.

Edge inputs (errors are ``LowbitError`` naming the tensor, the ``name`` argument):

- Input ``x`` must be a real floating-point tensor: complex (the imaginary part would be lost), integer
  and bool tensors are refused. NaN or Inf raises ``NonFiniteError``; float64 values beyond float32's
  range (which the float32 arithmetic would turn into Inf) raise ``LowbitError``.
- Empty tensors give empty codes and qparams of the shape ``lowbit.core.spec`` documents; a block with
  no element gets scale 1 (as an all-zero block). A 0-d tensor is one block under PerTensor/PerToken;
  PerChannel/PerGroup refuse it (no axis).
- ``dequantize`` (and ``fake_quantize``) return any floating dtype, float64 included: the arithmetic stays
  float32 and the result is cast, so float64 output is the float32 result exactly.
- Scales are stored in ``spec.scale_dtype``, clamped below at its smallest normal: a block too small for
  it (float16: max |x| under ``qmax`` x 6.1e-5) keeps that scale, never saturates, and each element comes
  back within half of it (a subnormal scale would lose precision and saturate codes). A scale past the
  dtype's largest value (float16: 65504, reached near |x| ~ 1e6 for int4) raises ``LowbitError``
  suggesting float32 or bfloat16 scales; float32 scales saturate at float32's limit as ``dequantize`` does.
- A codebook code (nf4, log2, binary) with no level raises ``LowbitError`` naming the code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.formats import Format
from lowbit.core.spec import QuantSpec, qparam_shape

Tensor = torch.Tensor
F32_MAX = torch.finfo(torch.float32).max


def to_blocks(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """View ``x`` as ``(*qparam_shape, prod(block))``; padding (see spec docstring) is NaN."""
    shape = tuple(x.shape)
    nblk = qparam_shape(shape, block)
    pads: list[int] = []
    for s, b, n in zip(reversed(shape), reversed(block), reversed(nblk), strict=True):
        pads += [0, n * b - s]
    if any(pads):
        x = F.pad(x, pads, value=float("nan"))
    inter = [d for n, b in zip(nblk, block, strict=True) for d in (n, b)]
    nd = len(shape)
    perm = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
    return x.reshape(inter).permute(perm).reshape(*nblk, math.prod(block))


def from_blocks(xb: Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> Tensor:
    """Inverse of ``to_blocks``: ``(*qparam_shape, prod(block))`` back to ``shape``, padding dropped."""
    nblk = qparam_shape(shape, block)
    nd = len(shape)
    x = xb.reshape((*nblk, *block))
    perm = [p for i in range(nd) for p in (i, nd + i)]
    x = x.permute(perm).reshape([n * b for n, b in zip(nblk, block, strict=True)])
    if tuple(x.shape) != tuple(shape):
        x = x[tuple(slice(0, s) for s in shape)]
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``NonFiniteError`` naming ``name`` if ``x`` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{name}: {bad} of {x.numel()} values are NaN or Inf")


def check_input(x: Tensor, name: str) -> None:
    """Raise ``LowbitError`` naming ``name`` unless ``x`` is a real floating-point tensor of finite values
    (``NonFiniteError`` otherwise) within float32's range (the arithmetic is float32)."""
    if x.is_complex():
        raise LowbitError(
            f"{name}: {str(x.dtype)[6:]} input is not supported (the imaginary part would be lost)"
        )
    if not x.is_floating_point():
        raise LowbitError(f"{name}: {str(x.dtype)[6:]} input; quantization takes floating-point tensors")
    check_finite(x, name)
    if torch.finfo(x.dtype).max > F32_MAX and x.numel():
        big = x.abs() > F32_MAX
        if bool(big.any()):
            raise LowbitError(
                f"{name}: {int(big.sum())} of {x.numel()} values lie beyond float32's range (largest "
                f"|x| {float(x.abs().max()):.3g} > {F32_MAX:.3g}); quantization computes in float32"
            )


def no_table(spec: QuantSpec) -> None:
    """``LowbitError`` for a table format (lut2..lut4): its levels are fitted per tensor, not a range rule."""
    if spec.fmt.kind == "table":
        raise LowbitError(
            f"format {spec.format} has a fitted table per tensor: quantize with lowbit.algorithms.kmeans "
            "(or rtn, which fits it), not the range-based primitives"
        )


def check_qparams(scale: Tensor, zero_point: Tensor | None, shape: tuple[int, ...], spec: QuantSpec) -> None:
    """Raise ``LowbitError`` unless scale (and zero point) have ``qparam_shape`` (no silent broadcasting)."""
    no_table(spec)
    want = qparam_shape(tuple(shape), spec.block_size(tuple(shape)))
    for label, p in (("scale", scale), ("zero_point", zero_point)):
        if p is not None and tuple(p.shape) != want:
            raise LowbitError(
                f"{label} shape {tuple(p.shape)} != {want} for a {tuple(shape)} tensor "
                f"under {spec.granularity}"
            )


def _range(xb: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest real (non-NaN) element per block; 0 for blocks with no element."""
    if xb.shape[-1] == 0:
        zero = xb.new_zeros(xb.shape[:-1])
        return zero, zero
    nan = torch.isnan(xb)
    lo = torch.where(nan, math.inf, xb).amin(-1)
    hi = torch.where(nan, -math.inf, xb).amax(-1)
    return lo, hi


def _int_qparams(lo: Tensor, hi: Tensor, fmt: Format, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """float32 scale and float32 zero point for an integer format, before the dtype casts."""
    if spec.symmetric:
        zp = 0 if fmt.qmin < 0 else (fmt.qmax + 1) // 2
        half = fmt.qmax - zp
        if half < 1:
            raise LowbitError(f"format {fmt.name} has no room for symmetric quantization")
        amax = torch.maximum(lo.abs(), hi.abs()) * spec.clip_ratio
        return amax / half, torch.full_like(lo, float(zp))
    lo = torch.clamp(lo * spec.clip_ratio, max=0.0)
    hi = torch.clamp(hi * spec.clip_ratio, min=0.0)
    span = float(fmt.qmax - fmt.qmin)
    scale = hi / span - lo / span  # no overflow where hi - lo would exceed float32
    return scale, torch.full_like(lo, float("nan"))  # zero point fitted after the scale cast


def choose_qparams(x: Tensor, spec: QuantSpec, name: str = "tensor") -> tuple[Tensor, Tensor | None]:
    """Scale (``spec.scale_dtype``) and zero point (code dtype, int formats only) per block of ``x``."""
    no_table(spec)
    check_input(x, name)
    block = spec.block_size(tuple(x.shape))
    xb = to_blocks(x.float(), block)
    lo, hi = _range(xb)
    mean_abs = None
    if spec.fmt.name == "binary":
        count = (~torch.isnan(xb)).sum(-1).clamp(min=1)
        mean_abs = torch.where(torch.isnan(xb), 0.0, xb.abs()).sum(-1) / count
    return _qparams(lo, hi, spec, mean_abs, name)


def qparams_from_range(
    lo: Tensor,
    hi: Tensor,
    spec: QuantSpec,
    *,
    mean_abs: Tensor | None = None,
    name: str = "qparams_from_range(lo, hi)",
) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point of blocks whose observed values span ``[lo, hi]`` (the one qparam rule).

    ``lo``/``hi``: float tensors of one shape, ``lo <= hi``; the results have that shape, the scale in
    ``spec.scale_dtype``, the zero point in the code dtype (``None`` for float and codebook formats).
    ``binary`` scales by the mean ``|x|`` of a block, which a range cannot give: pass ``mean_abs``.
    ``name`` labels the errors (as ``choose_qparams``'s).
    """
    no_table(spec)
    if lo.shape != hi.shape:
        raise LowbitError(f"lo shape {tuple(lo.shape)} != hi shape {tuple(hi.shape)}")
    check_input(torch.stack([lo, hi]), name)
    lo, hi = lo.float(), hi.float()
    if bool((lo > hi).any()):
        raise LowbitError(f"lo > hi in {int((lo > hi).sum())} of {lo.numel()} ranges")
    return _qparams(lo, hi, spec, mean_abs, name)


def _qparams(
    lo: Tensor, hi: Tensor, spec: QuantSpec, mean_abs: Tensor | None, name: str
) -> tuple[Tensor, Tensor | None]:
    """``qparams_from_range`` on float32 ranges already checked (``choose_qparams`` comes here directly)."""
    fmt = spec.fmt
    const = lo == hi
    if fmt.kind == "int":
        scale, zp = _int_qparams(lo, hi, fmt, spec)
    elif fmt.kind == "float":
        amax = torch.maximum(lo.abs(), hi.abs()) * spec.clip_ratio
        scale = torch.ones_like(lo) if fmt.bits == 16 else amax / fmt.float_max
    elif fmt.name == "binary":
        if mean_abs is None or mean_abs.shape != lo.shape:
            raise LowbitError("format binary scales by the mean |x| of a block: pass mean_abs (lo's shape)")
        scale = mean_abs.float()
    else:
        scale = torch.maximum(lo.abs(), hi.abs()) * spec.clip_ratio
    if fmt.kind != "float" or fmt.bits != 16:
        scale = torch.where(const, lo.abs(), scale)
    # an all-zero block gets scale 1 (exact zero), except binary (no zero level): tiny, so it reads +-tiny
    scale = torch.where(scale == 0, 0.0 if fmt.name == "binary" else 1.0, scale)
    scale = _cast_scale(scale, spec, name)
    if fmt.kind != "int":
        return scale, None
    zp = _fit_zero_point(zp, lo * spec.clip_ratio, const, scale.float(), fmt)
    return scale, zp.to(fmt.torch_dtype)


def _cast_scale(scale: Tensor, spec: QuantSpec, name: str) -> Tensor:
    """float32 ``scale`` in ``spec.scale_dtype``, clamped to its smallest normal; ``LowbitError`` where a
    float16/bfloat16 scale would pass the dtype's largest value (float32 scales saturate there)."""
    sdt = spec.torch_scale_dtype
    info = torch.finfo(sdt)
    over = scale > info.max
    if sdt != torch.float32 and bool(over.any()):
        other = "'float32'" if sdt == torch.bfloat16 else "'float32' or 'bfloat16'"
        raise LowbitError(
            f"{name}: scale {float(scale.max()):.3g} overflows {spec.scale_dtype} (largest "
            f"{info.max:.6g}) in {int(over.sum())} of {scale.numel()} blocks: the values are too large "
            f"for {spec.scale_dtype} scales; use scale_dtype={other}"
        )
    return scale.clamp(info.tiny, info.max).to(sdt)


def _fit_zero_point(zp: Tensor, lo: Tensor, const: Tensor, scale: Tensor, fmt: Format) -> Tensor:
    """Asymmetric zero point from the stored scale; constant blocks get a zp one code from their value."""
    fitted = torch.isnan(zp)
    zp = torch.where(fitted, fmt.qmin - torch.round(torch.clamp(lo, max=0.0) / scale), zp)
    if fmt.qmin < 0:
        const_zp = torch.where(fitted, 0.0, zp)
    else:
        const_zp = torch.where(fitted, (lo < 0).float(), zp)
    zp = torch.where(const, const_zp, zp)
    return zp.clamp(fmt.qmin, fmt.qmax)


def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, name: str = "tensor"
) -> Tensor:
    """Codes of ``x`` (shape ``x.shape``, dtype ``spec.fmt.torch_dtype``) for the given qparams."""
    check_input(x, name)
    check_qparams(scale, zero_point, tuple(x.shape), spec)
    fmt = spec.fmt
    block = spec.block_size(tuple(x.shape))
    xb = torch.nan_to_num(to_blocks(x.float(), block), nan=0.0)
    v = xb / scale.float()[..., None]
    if fmt.kind == "int":
        zp = zero_point.float()[..., None] if zero_point is not None else 0.0
        q = torch.clamp(torch.round(v) + zp, fmt.qmin, fmt.qmax)
    else:
        q = scale_only_codes(v, fmt)
    return from_blocks(q, tuple(x.shape), block).to(fmt.torch_dtype)


def level_midpoints(fmt: Format, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """A codebook format's ascending levels ``(K,)`` float32 and the ``K - 1`` midpoints between them."""
    levels = torch.tensor(fmt.levels, dtype=torch.float32, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


def scale_only_codes(v: Tensor, fmt: Format, mids: Tensor | None = None) -> Tensor:
    """The rounding rule of scale-only formats, for ``v = x / scale``: a float format's codes are ``v``
    clamped to +-``float_max`` (the cast to ``fmt.torch_dtype`` then rounds); a codebook's are the index
    of the nearest level (``mids``: ``level_midpoints``, built from ``fmt`` when None; ties go down)."""
    if fmt.kind == "float":
        return v.clamp(-fmt.float_max, fmt.float_max)
    if mids is None:
        mids = level_midpoints(fmt, v.device)[1]
    return torch.bucketize(v.contiguous(), mids)


def dequantize(
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    name: str = "codes",
) -> Tensor:
    """Real values of ``codes`` (shape ``codes.shape``) in the floating ``dtype``; arithmetic in float32,
    saturated at the largest value of ``dtype`` or float32, whichever is smaller."""
    if not dtype.is_floating_point:
        raise LowbitError(f"{name}: dequantize returns a floating-point dtype, not {dtype}")
    check_qparams(scale, zero_point, tuple(codes.shape), spec)
    fmt = spec.fmt
    block = spec.block_size(tuple(codes.shape))
    vb = to_blocks(_code_values(codes, fmt, name), block)
    if fmt.kind == "int" and zero_point is not None:
        vb = vb - zero_point.float()[..., None]
    out = from_blocks(vb * scale.float()[..., None], tuple(codes.shape), block)
    big = min(torch.finfo(dtype).max, F32_MAX)  # where the grid's last half step passes the range
    return out.clamp(-big, big).to(dtype)


def _code_values(codes: Tensor, fmt: Format, name: str) -> Tensor:
    """float32 value of each code before scaling: its level for codebook formats (``LowbitError`` for a
    code with no level), else the code itself."""
    if fmt.kind != "codebook":
        return codes.float()
    n = len(fmt.levels)
    bad = (codes < 0) | (codes >= n)
    if bool(bad.any()):
        raise LowbitError(
            f"{name}: {fmt.name} code {int(codes[bad][0])} out of range (codes 0..{n - 1}); "
            f"{int(bad.sum())} of {codes.numel()} codes have no level"
        )
    levels = torch.tensor(fmt.levels, dtype=torch.float32, device=codes.device)
    return levels[codes.long()]


def fake_quantize(
    x: Tensor,
    spec: QuantSpec,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
    name: str = "tensor",
) -> Tensor:
    """``dequantize(quantize(x))`` in ``x.dtype`` with a straight-through gradient.

    The gradient is 1 where ``x`` lies inside the representable range and 0 where it was clamped.
    Qparams are chosen from ``x`` (detached) when not given.
    """
    if scale is None:
        scale, zero_point = choose_qparams(x.detach(), spec, name)
    q = quantize(x.detach(), scale, zero_point, spec, name)
    dq = dequantize(q, scale, zero_point, spec, dtype=x.dtype)
    inside = _inside(x.detach(), scale, zero_point, spec)
    return dq + (x - x.detach()) * inside


def _inside(x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec) -> Tensor:
    """Mask (``x.dtype``) of elements that quantize without clamping."""
    fmt = spec.fmt
    block = spec.block_size(tuple(x.shape))
    v = to_blocks(x.float(), block) / scale.float()[..., None]
    if fmt.kind == "int":
        zp = zero_point.float()[..., None] if zero_point is not None else 0.0
        r = torch.round(v) + zp
        m = (r >= fmt.qmin) & (r <= fmt.qmax)
    elif fmt.kind == "float":
        m = v.abs() <= fmt.float_max
    else:
        m = (v >= fmt.levels[0]) & (v <= fmt.levels[-1])
    return from_blocks(m.to(x.dtype), tuple(x.shape), block)
