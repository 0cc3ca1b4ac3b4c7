"""CPU weight-only matmuls through the kernels PyTorch ships; the weight is never dequantized.

| backend        | weights it takes                                      | torch kernel                    |
|----------------|-------------------------------------------------------|---------------------------------|
| `cpu_int8pack` | int8 symmetric, one scale per output channel          | ``_weight_int8pack_mm``         |
| `cpu_int4pack` | int4/uint4, groups of 32..256 along K, rows % 16 == 0 | ``_weight_int4pack_mm_for_cpu`` |

Both can be slower than float32 (``benchmarks/results/linear_cpu.md``), so they rank below lowbit's
own kernels (``cpu_native``); they stay registered for ``lowbit advise`` to measure and for ``backend=``
to force.

int8 reads the stored bytes as they are (two's complement, see ``lowbit.core.codec``). int4 is
repacked once into torch's layout, with lowbit's integer zero points folded into torch's
``w = (u - 8) * scale + zero`` form: for an unsigned code ``u = q - qmin``,
``(q - zp) * s = (u - 8) * s + (8 + qmin - zp) * s``. An input dimension that the group does not divide
is padded with zero weights (and the activations with zeros), so every group size of 32..256 works.
Activations run in their own dtype (float32, bfloat16 or float16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.core.codec import decode
from lowbit.core.packing import to_unsigned
from lowbit.core.spec import PerChannel, PerGroup
from lowbit.kernels.registry import prepared, register_backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUPS = (32, 64, 128, 256)


def _int8_ok(layer, device: torch.device) -> bool:
    s = layer.spec
    return (
        device.type == "cpu"
        and s.format == "int8"
        and s.symmetric
        and isinstance(s.granularity, PerChannel)
        and s.granularity.axis in (0, -2)
    )


def _flat(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x.reshape(-1, cols).contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, layer) -> torch.Tensor:
    y = y.reshape(*x.shape[:-1], layer.rows)
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y


def _int8_compute_dtype(x: torch.Tensor, cols: int) -> torch.dtype:
    """torch 2.13's kernel crashes (SIGSEGV) on bfloat16 with cols % 16 != 0 and 2+ rows: use float32."""
    if x.dtype not in FLOAT_DTYPES or (x.dtype == torch.bfloat16 and cols % 16):
        return torch.float32
    return x.dtype


@register_backend("weight_only_linear", "cpu_int8pack", supports=_int8_ok, priority=5)
def int8_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., cols) @ W.T`` with int8 ``W (rows, cols)`` read in place."""
    dt = _int8_compute_dtype(x, layer.cols)
    scale = prepared(layer, f"int8:{dt}", lambda: layer.scale.reshape(-1).to(dt).contiguous())
    y = torch._weight_int8pack_mm(_flat(x, layer.cols).to(dt), layer.qweight.view(torch.int8), scale)
    return _finish(y.to(x.dtype), x, layer)


def _int4_ok(layer, device: torch.device) -> bool:
    s, g = layer.spec, layer.spec.granularity
    return (
        device.type == "cpu"
        and s.format in ("int4", "uint4")
        and isinstance(g, PerGroup)
        and g.axis in (1, -1)
        and g.size in INT4_GROUPS
        and layer.rows % 16 == 0
    )


def _int4_pack(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales_and_zeros (groups, rows, 2), padded cols) in torch's int4 CPU layout."""
    fmt, g = layer.spec.fmt, layer.spec.granularity.size
    u = to_unsigned(decode(layer.qweight, fmt, layer.cols), fmt).to(torch.int32)
    padded = -(-layer.cols // g) * g
    u = F.pad(u, (0, padded - layer.cols), value=8)  # (8 - 8) * s: zero weights, times zero inputs
    scale = layer.scale.float()
    zp = layer.zero_point.float() if layer.zero_point is not None else torch.zeros_like(scale)
    zero = (8 + fmt.qmin - zp) * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(u, 1), sz, padded


@register_backend("weight_only_linear", "cpu_int4pack", supports=_int4_ok, priority=5)
def int4_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x (..., cols) @ W.T`` with group-wise int4 ``W (rows, cols)`` in torch's packed layout."""
    dt = x.dtype if x.dtype in FLOAT_DTYPES else torch.float32
    packed, sz, padded = prepared(layer, f"int4:{dt}", lambda: _int4_pack(layer, dt))
    x2 = _flat(x, layer.cols).to(dt)
    if padded != layer.cols:
        x2 = F.pad(x2, (0, padded - layer.cols))
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, layer.spec.granularity.size, sz)
    return _finish(y.to(x.dtype), x, layer)
