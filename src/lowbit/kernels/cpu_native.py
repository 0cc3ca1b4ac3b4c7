"""Backends on lowbit's own CPU kernels (``lowbit.kernels.native``), reading the stored bytes in place.

| op                   | weights                          | small batch          | large batch            |
|----------------------|----------------------------------|----------------------|------------------------|
| `weight_only_linear` | int8/uint8/int4/uint4, 4-bit     | fused GEMV: codes to | dequantize ~1 MiB tiles|
|                      | codebooks (nf4, fp4, log2: table | floats in registers  | of W, sgemm each tile  |
|                      | lookup, one permute per 16 codes)|                      |                        |
|                      | per chan. or groups of 32k       |                      |                        |
| `dynamic_linear`     | int8 symmetric per channel       | u8 x s8 dot products | ``torch._int_mm``      |

On CPUs with AVX512-BF16, 4-bit weights meet one or two activation rows with bf16 dot products: the
activations are split exactly into three bf16 terms, so the products are float32's (see the C source).
"Small batch" is up to ``layer.native_gemv_rows`` activation rows (default ``GEMV_ROWS``; ``lowbit advise``
measures the crossover per shape). Activations run in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch

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


def _weight_args(layer) -> tuple:
    """(w, N, row_bytes, code, offset, group, scale, scale kind, zp, zp kind, lut, lut stride) for the C
    kernels."""
    code, offset = CODES[layer.spec.format]
    zp = layer.zero_point
    lut, stride = prepared(layer, "native_lut", lambda: _lut(layer))
    return (
        layer.qweight.data_ptr(),
        layer.rows,
        layer.qweight.shape[1],
        code,
        offset,
        _group(layer),
        layer.scale.data_ptr(),
        SCALE_KINDS[layer.scale.dtype],
        zp.data_ptr() if zp is not None else None,
        ZP_KINDS[zp.dtype] if zp is not None else 0,
        lut.data_ptr() if lut is not None else None,
        stride,
    )


def _bias(layer) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.float().contiguous()


def gemv(x: torch.Tensor, layer) -> torch.Tensor:
    """float32 ``x (M, K)`` contiguous -> ``(M, N)``, one pass over the stored weight."""
    w, n, rb, code, off, group, sc, sk, zp, zk, lut, ls = _weight_args(layer)
    y = torch.empty(x.shape[0], n)
    b = _bias(layer)
    rc = native.library().lb_wo_gemm(
        x.data_ptr(), x.shape[0], layer.cols, w, n, rb, code, off, group, sc, sk, zp, zk, lut, ls,
        b.data_ptr() if b is not None else None, y.data_ptr(), native.threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("lowbit native kernel could not allocate its activation buffer")
    return y


def dequantize_rows(layer, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``n0:n1`` of the weight as float32, written into ``out (n1 - n0, K)``."""
    w, _, rb, code, off, group, sc, sk, zp, zk, lut, ls = _weight_args(layer)
    native.library().lb_dequant_rows(
        w, n0, n1, layer.cols, rb, code, off, group, sc, sk, zp, zk, lut, ls, out.data_ptr(), native.threads()
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


@register_backend("weight_only_linear", "cpu_native", supports=_weight_ok, priority=20)
def weight_only_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., K) @ W.T + b``: fused GEMV up to ``native_gemv_rows`` rows, tiled sgemm above."""
    x2 = x.reshape(-1, layer.cols).float().contiguous()
    limit = getattr(layer, "native_gemv_rows", GEMV_ROWS)
    y = gemv(x2, layer) if x2.shape[0] <= limit else tiled(x2, layer)
    return y.reshape(*x.shape[:-1], layer.rows).to(x.dtype)


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
    b = _bias(layer)
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
    limit = getattr(layer, "native_gemv_rows", GEMV_ROWS)
    # torch 2.13's CPU _int_mm returns wrong sums for K == 1: small inner dimensions stay on our kernel
    small = x2.shape[0] <= limit or layer.cols < 8
    y = w8a8_small(x2, layer) if small else w8a8_large(x2, layer)
    return y.reshape(*x.shape[:-1], layer.rows).to(x.dtype)
