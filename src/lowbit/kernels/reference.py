"""Reference backends: decode, dequantize, then the float op. Always available; the oracle for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.algorithms.rtn import table_values
from lowbit.core.codec import decode
from lowbit.core.primitives import choose_qparams, dequantize, quantize
from lowbit.core.spec import PerToken, QuantSpec
from lowbit.kernels.registry import register_backend


def dequantize_weight(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    n: int,
    dtype: torch.dtype,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float weight ``(rows, n)`` from stored bytes ``(rows, stored_bytes(n))`` and its qparams; a table
    format's values come from ``levels`` (``lowbit.algorithms.kmeans``)."""
    if spec.fmt.kind == "table":
        return table_values(decode(qweight, spec.fmt, n), scale, levels, dtype)
    return dequantize(decode(qweight, spec.fmt, n), scale, zero_point, spec, dtype)


@register_backend("weight_only_linear", "reference", priority=0)
def weight_only_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., cols) @ W.T + bias`` with ``W (rows, cols)`` stored quantized in ``layer``."""
    w = layer.dequantized_weight(x.dtype)
    return F.linear(x, w, layer.bias)


@register_backend("embedding", "reference", priority=0)
def embedding(ids: torch.Tensor, layer) -> torch.Tensor:
    """Rows ``ids (...)`` of a quantized ``(rows, cols)`` table, float32: only gathered rows are decoded."""
    flat = ids.reshape(-1)
    zp = layer.zero_point[flat] if layer.zero_point is not None else None
    rows = dequantize_weight(
        layer.qweight[flat], layer.scale[flat], zp, layer.spec, layer.cols, torch.float32
    )
    return rows.reshape(*ids.shape, layer.cols)


# W8A8 dynamic activations: uint8 with a zero point per token. Asymmetric codes spend all 256 levels on
# each token's [min, max], which costs less perplexity than symmetric int8 (amax / 127).
DYNAMIC_ACTIVATIONS = QuantSpec("uint8", False, PerToken(), "float32")


@register_backend("dynamic_linear", "reference", priority=0)
def dynamic_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """W8A8 semantics: ``x`` fake-quantized per token (``layer.act_spec``), then the float matmul."""
    xf = x.float()
    spec = layer.act_spec
    scale, zp = choose_qparams(xf, spec, name="activation")
    xq = dequantize(quantize(xf, scale, zp, spec), scale, zp, spec)
    w = dequantize_weight(layer.qweight, layer.scale, layer.zero_point, layer.spec, layer.cols, torch.float32)
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(xq, w, bias).to(x.dtype)
