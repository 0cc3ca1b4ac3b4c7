"""Backends on lowbit's own CPU kernels (``lowbit.kernels.native``), reading the stored bytes in place.

| op / backend         | weights                          | small batch          | large batch            |
|----------------------|----------------------------------|----------------------|------------------------|
| `weight_only_linear` | int8/uint8/int4/uint4, 4-bit     | fused GEMV: codes to | dequantize ~1 MiB tiles|
| `cpu_native`         | codebooks (nf4, fp4, log2: table | floats in registers  | of W, sgemm each tile  |
|                      | lookup, one permute per 16 codes)|                      |                        |
|                      | per chan. or groups of 32k       |                      |                        |
| `weight_only_linear` | int8/uint8/int4/uint4, per chan. | activations rounded  | as `cpu_native`        |
| `cpu_native_a8`      | or groups of 32k                 | to int8 per 32, u8 x |                        |
|                      |                                  | s8 dot products      |                        |
| `dynamic_linear`     | int8 symmetric per channel       | u8 x s8 dot products | ``torch._int_mm``      |
| `cpu_native`         |                                  |                      |                        |

With AVX-512, 4-bit codes become floats 16 at a time by one permute of a 16-float table and meet up to 4
activation rows in float32 FMAs (``csrc/lowbit_cpu_q4.c``).
"Small batch" is up to ``layer.native_gemv_rows`` activation rows (default ``GEMV_ROWS``; ``lowbit advise``
measures the crossover per shape). Activations run in float32 and the result is cast back to the input dtype.

``cpu_native_a8`` is not exact: in small batches it rounds every activation row to int8 per block of 32
values (scale max|x| / 127, like llama.cpp's Q8_0; ``csrc/lowbit_cpu_a8.c`` states the rule) and sums
integer products (vpdpbusd). It needs AVX512-VNNI and, registered with ``exact=False``, runs only where
asked for by name (``backend=``, ``prefer=``, ``routes``). A layer's forward sends large batches to the exact
tiled path; the kernel itself takes any number of rows (``lowbit.decode``'s one-call prompt runs it on all).
"""

from __future__ import annotations

import ctypes

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.spec import PerChannel, PerGroup
from lowbit.kernels import native
from lowbit.kernels.reference import DYNAMIC_ACTIVATIONS
from lowbit.kernels.registry import prepared, register_backend

# format -> (code kind, offset); kind 3: 4-bit indices into a 16-entry level table (the format's own, or
# the layer's fitted ``levels``, one table per output channel)
CODES = {"int8": (0, 0), "uint8": (1, 0), "int4": (2, -8), "uint4": (2, 0),
         "nf4": (3, 0), "fp4_e2m1": (3, 0), "log2": (3, 0), "lut4": (3, 0)}  # fmt: skip
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ZP_KINDS = {torch.int8: 1, torch.uint8: 2}
A8_FORMATS = ("int8", "uint8", "int4", "uint4")  # integer codes: what ``cpu_native_a8`` takes
GEMV_ROWS = 16
TILE_BYTES = 1 << 20


def _group(layer) -> int | None:
    """Codes per scale along K, or None if the kernels cannot take this granularity."""
    g = layer.spec.granularity
    if isinstance(g, PerChannel) and g.axis in (0, -2):
        return layer.cols
    if isinstance(g, PerGroup) and g.axis in (1, -1) and (g.size % 32 == 0 or g.size >= layer.cols):
        return min(g.size, layer.cols)
    return None


def _weight_ok(layer, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and layer.spec.format in CODES
        and _group(layer) is not None
        and layer.scale.dtype in SCALE_KINDS
        and (layer.zero_point is None or layer.zero_point.dtype in ZP_KINDS)
        and native.available()
    )


def _lut(layer) -> tuple[torch.Tensor | None, int]:
    """(float32 level tables, floats between rows' tables): a codebook format's (16,) levels (unused codes
    0) for every row, a table format's ``levels`` (16 per row, or one table), or None for integer codes."""
    fmt = layer.spec.fmt
    if fmt.kind == "table":
        levels = layer.levels.float().contiguous()
        return levels, 16 if levels.shape[0] > 1 else 0
    if fmt.kind != "codebook":
        return None, 0
    return torch.tensor(fmt.levels + (0.0,) * (16 - len(fmt.levels)), dtype=torch.float32), 0


def kinds(layer) -> dict:
    """The C kernels' constant description of a weight ``cpu_native`` runs: code kind and offset, codes per
    scale (group), scale and zero-point kinds."""
    code, offset = CODES[layer.spec.format]
    zp = layer.zero_point
    return {
        "code": code,
        "offset": offset,
        "group": _group(layer),
        "scale_kind": SCALE_KINDS[layer.scale.dtype],
        "zp_kind": ZP_KINDS[zp.dtype] if zp is not None else 0,
    }


def _native_args(layer) -> tuple:
    """The weight's arguments of the C kernels as ctypes objects (a Python int costs ~0.05 us a call to
    convert): ``(K, w, N, row bytes, code, offset, group, scale, scale kind, zp, zp kind)``, ``(lut, lut
    stride)``, then the zero-point tensor and the tensors the pointers point into (held, so that no new
    buffer can reuse their addresses while these arguments are cached)."""
    k = kinds(layer)
    zp = layer.zero_point
    lut, stride = prepared(layer, "native_lut", lambda: _lut(layer))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    head = (
        i64(layer.cols),
        ptr(layer.qweight.data_ptr()),
        i64(layer.rows),
        i64(layer.qweight.shape[1]),
        i32(k["code"]),
        i32(k["offset"]),
        i64(k["group"]),
        ptr(layer.scale.data_ptr()),
        i32(k["scale_kind"]),
        ptr(zp.data_ptr() if zp is not None else None),
        i32(k["zp_kind"]),
    )
    keep = (layer.qweight, layer.scale, zp, lut)
    return head, (ptr(lut.data_ptr() if lut is not None else None), i64(stride)), zp, keep


def _weight_args(layer) -> tuple:
    """``_native_args``, built once per weight (``prepared`` watches ``qweight`` and ``scale``; a zero
    point replaced on its own is caught here)."""
    args = prepared(layer, "native_args", lambda: _native_args(layer))
    return args if args[2] is layer.zero_point else _native_args(layer)


def bias32(layer) -> torch.Tensor | None:
    """The layer's bias as float32, contiguous (itself where it already is), or None."""
    b = layer.bias
    return b if b is None or (b.dtype == torch.float32 and b.is_contiguous()) else b.float().contiguous()


def _run(fn, x: torch.Tensor, layer, *weight) -> torch.Tensor:
    """``fn(x, M, *weight, bias, y, threads)`` for float32 ``x (..., K)`` contiguous (M rows); ``y (..., N)``
    new."""
    b = bias32(layer)
    y = torch.empty(*x.shape[:-1], layer.rows)
    bias = b.data_ptr() if b is not None else None
    rc = fn(x.data_ptr(), x.numel() // layer.cols, *weight, bias, y.data_ptr(), native.threads())
    if rc == -1:
        raise MemoryError("lowbit native kernel could not allocate its activation buffer")
    if rc != 0:
        raise LowbitError(f"lowbit native kernel refused its arguments (code {rc})")
    return y


def gemv(x: torch.Tensor, layer) -> torch.Tensor:
    """float32 ``x (..., K)`` contiguous -> ``(..., N)``, one pass over the stored weight."""
    head, lut, _, _ = _weight_args(layer)
    return _run(native.library().lb_wo_gemm, x, layer, *head, *lut)


def gemv_a8(x: torch.Tensor, layer) -> torch.Tensor:
    """float32 ``x (..., K)`` contiguous -> ``(..., N)``: ``x`` rounded to int8 per block of 32, integer dot
    products with the stored codes (``lb_wo_gemm_a8``)."""
    head, _, _, _ = _weight_args(layer)
    return _run(native.library().lb_wo_gemm_a8, x, layer, *head)


def dequantize_rows(layer, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``n0:n1`` of the weight as float32, written into ``out (n1 - n0, K)``."""
    (k, w, _, rb, code, off, group, sc, sk, zp, zk), lut, _, _ = _weight_args(layer)
    native.library().lb_dequant_rows(
        w, n0, n1, k, rb, code, off, group, sc, sk, zp, zk, *lut, out.data_ptr(), native.threads()
    )
    return out


def tiled(x: torch.Tensor, layer) -> torch.Tensor:
    """float32 ``x (M, K)`` -> ``(M, N)``: dequantize ~1 MiB row tiles of W and sgemm each."""
    n, k = layer.rows, layer.cols
    tile = max(16, min(n, TILE_BYTES // (4 * k)))
    buf, y_t = torch.empty(tile, k), torch.empty(n, x.shape[0])
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        torch.mm(dequantize_rows(layer, n0, n1, buf[: n1 - n0]), x.t(), out=y_t[n0:n1])
    y = y_t.t()
    return y + layer.bias.float() if layer.bias is not None else y


def gemv_rows(layer) -> int:
    """``layer.native_gemv_rows`` or ``GEMV_ROWS``, read without ``nn.Module.__getattr__``'s exception
    (~1 us) when the layer has none."""
    limit = layer.__dict__.get("native_gemv_rows")
    return limit if limit is not None else getattr(type(layer), "native_gemv_rows", GEMV_ROWS)


def _linear(x: torch.Tensor, layer, small) -> torch.Tensor:
    """``x (..., K) @ W.T + b``: ``small(x, layer)`` up to ``native_gemv_rows`` rows, tiled sgemm above.
    A float32 contiguous ``x`` goes in as it is (no copy, no reshape: the fixed cost of a decode step)."""
    if x.shape[-1] != layer.cols:
        raise LowbitError(f"expected inputs (..., {layer.cols}), got {tuple(x.shape)}")
    if x.numel() // layer.cols > gemv_rows(layer):
        y = tiled(x.reshape(-1, layer.cols).float().contiguous(), layer)
        return y.reshape(*x.shape[:-1], layer.rows).to(x.dtype)
    if x.dtype == torch.float32 and x.is_contiguous():
        return small(x, layer)
    return small(x.float().contiguous(), layer).to(x.dtype)


@register_backend("weight_only_linear", "cpu_native", supports=_weight_ok, priority=20)
def weight_only_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., K) @ W.T + b``: fused GEMV up to ``native_gemv_rows`` rows, tiled sgemm above."""
    return _linear(x, layer, gemv)


def _a8_ok(layer, device: torch.device) -> bool:
    return (
        layer.spec.format in A8_FORMATS and _weight_ok(layer, device) and native.library().lb_has_vnni() == 1
    )


@register_backend("weight_only_linear", "cpu_native_a8", supports=_a8_ok, priority=10, exact=False)
def weight_only_linear_a8(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., K) @ W.T + b`` with activations rounded to int8 per block of 32 up to
    ``native_gemv_rows`` rows (``gemv_a8``), the exact tiled sgemm above."""
    return _linear(x, layer, gemv_a8)


def _w8a8_ok(layer, device: torch.device) -> bool:
    s, g = layer.spec, layer.spec.granularity
    return (
        device.type == "cpu"
        and s.format == "int8"
        and s.symmetric
        and isinstance(g, PerChannel)
        and g.axis in (0, -2)
        and layer.scale.dtype in SCALE_KINDS
        and layer.act_spec == DYNAMIC_ACTIVATIONS
        and native.available()
    )


def w8a8_small(x: torch.Tensor, layer) -> torch.Tensor:
    """float32 ``x (M, K)`` contiguous -> ``(M, N)``: per-token uint8 ``x`` with a zero point, u8 x s8 dot
    products (VNNI), zero-point term from the weight row sums."""
    m, n = x.shape[0], layer.rows
    y, xs = torch.empty(m, n), torch.empty(m)
    b = bias32(layer)
    rc = native.library().lb_w8a8_gemm(
        x.data_ptr(), m, layer.cols, layer.qweight.data_ptr(), n, layer.scale.data_ptr(),
        SCALE_KINDS[layer.scale.dtype], b.data_ptr() if b is not None else None, y.data_ptr(),
        xs.data_ptr(), native.threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("lowbit native kernel could not allocate its activation buffer")
    return y


def w8a8_large(x: torch.Tensor, layer) -> torch.Tensor:
    """Same result for many rows: per-token uint8 codes (the rule of ``lb_w8a8_gemm``/``choose_qparams``,
    vectorized), shifted to int8 for ``torch._int_mm``: ``sum((q - zp) w) = sum((q - 128) w) + (128 - zp)
    sum(w)``, int32 accumulation."""
    mn, mx = torch.aminmax(x, dim=1, keepdim=True)
    const = mn == mx
    s = torch.where(const, mn.abs(), mx.clamp(min=0) / 255 - mn.clamp(max=0) / 255)
    s = torch.where(s == 0, 1.0, s).clamp_(torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)
    zp = torch.where(const, (mn < 0).float(), -torch.round(mn.clamp(max=0) / s)).clamp_(0, 255)
    xq = (torch.round(x / s) + (zp - 128)).clamp_(-128, 127).to(torch.int8)
    w = layer.qweight.view(torch.int8)
    wsum = prepared(layer, "w8a8_row_sums", lambda: w.sum(1, dtype=torch.int32))
    acc = torch._int_mm(xq, w.t()) + (128 - zp.to(torch.int32)) * wsum.reshape(1, -1)
    y = acc.float() * s * layer.scale.float().reshape(1, -1)
    return y + layer.bias.float() if layer.bias is not None else y


@register_backend("dynamic_linear", "cpu_native", supports=_w8a8_ok, priority=20)
def dynamic_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """W8A8 ``x (..., K) @ W.T + b``: own int8 kernel up to ``native_gemv_rows`` rows, oneDNN above."""
    x2 = x.reshape(-1, layer.cols).float().contiguous()
    limit = gemv_rows(layer)
    # torch 2.13's CPU _int_mm returns wrong sums for K == 1: small inner dimensions stay on our kernel
    small = x2.shape[0] <= limit or layer.cols < 8
    y = w8a8_small(x2, layer) if small else w8a8_large(x2, layer)
    return y.reshape(*x.shape[:-1], layer.rows).to(x.dtype)
