"""Reference backends: decode, dequantize, then the float op. Always available; the oracle for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.core.codec import decode
from lowbit.core.primitives import dequantize
from lowbit.core.spec import QuantSpec
from lowbit.kernels.registry import register_backend


def dequantize_weight(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    n: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Float weight ``(rows, n)`` from stored bytes ``(rows, stored_bytes(n))`` and its qparams."""
    return dequantize(decode(qweight, spec.fmt, n), scale, zero_point, spec, dtype)


@register_backend("weight_only_linear", "reference", priority=0)
def weight_only_linear(x, qweight, scale, zero_point, bias, spec: QuantSpec, in_features: int):
    """``x (..., in) @ W.T + bias`` with ``W (out, in)`` stored quantized."""
    w = dequantize_weight(qweight, scale, zero_point, spec, in_features, x.dtype)
    return F.linear(x, w, bias)


@register_backend("embedding", "reference", priority=0)
def embedding(ids, qweight, scale, zero_point, spec: QuantSpec, dim: int):
    """Rows ``ids (...)`` of a quantized ``(num, dim)`` table: only the gathered rows are decoded."""
    flat = ids.reshape(-1)
    zp = zero_point[flat] if zero_point is not None else None
    rows = dequantize_weight(qweight[flat], scale[flat], zp, spec, dim, torch.float32)
    return rows.reshape(*ids.shape, dim)
