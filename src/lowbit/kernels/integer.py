"""Integer-only static W8A8 ops: the reference backends of ``static_linear`` and ``static_conv2d``.

``qlinear`` takes activation codes and returns output codes, as ONNX's QLinearMatMul (plus bias) and
QLinearConv do::

    acc = sum((xq - x_zp) * wq) + bias_q          # exact integers (int32 range)
    yq  = requantize(acc, m0[c], t[c], y_zp)      # fixed point, lowbit.core.fixed_point

with ``bias_q = round_half_even(bias / (x_scale * w_scale[c]))`` (int32, as ONNX Runtime's quantizer
stores it) and ``m0 * 2**-t ~= x_scale * w_scale[c] / y_scale``. Layers with ``requantize_output``
False stop at the accumulator (ONNX Runtime's MatMulIntegerToFloat)::

    y = float32(sum((xq - x_zp) * wq)) * float32(x_scale * w_scale[c]) + bias

The products are summed in float32 where no partial sum can reach 2**24, else in float64 (exact
below 2**53), then handled as int64. Weights are symmetric (zero point 0), one scale per output
channel: int8 codes, narrower integer codes, or binary levels -1/+1 (``weight_values``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.core.codec import decode
from lowbit.core.fixed_point import quantize_multiplier, requantize
from lowbit.core.primitives import dequantize, quantize
from lowbit.kernels.registry import prepared, register_backend

Tensor = torch.Tensor
INT32 = (-(2**31), 2**31 - 1)


def _qparams(layer, side: str, ndim: int) -> tuple[Tensor, Tensor]:
    shape = (1,) * ndim
    return getattr(layer, f"{side}_scale").reshape(shape), getattr(layer, f"{side}_zero_point").reshape(shape)


def quantize_activation(x: Tensor, layer, side: str = "input") -> Tensor:
    """Codes of float ``x`` (any shape) under the layer's ``side`` qparams (ONNX QuantizeLinear)."""
    scale, zp = _qparams(layer, side, x.dim())
    return quantize(x.float(), scale, zp, layer.act_spec, name=f"{side} activation")


def dequantize_activation(codes: Tensor, layer, side: str = "output") -> Tensor:
    """float32 values of activation ``codes`` (ONNX DequantizeLinear)."""
    scale, zp = _qparams(layer, side, codes.dim())
    return dequantize(codes, scale, zp, layer.act_spec)


def weight_values(layer) -> Tensor:
    """Integer weight values ``(rows, cols)`` of a static layer: the codes, or a codebook's levels
    (``binary``: -1 and +1), in float64."""
    codes = decode(layer.qweight, layer.spec.fmt, layer.cols)
    if layer.spec.fmt.kind != "codebook":
        return codes.double()
    return torch.tensor(layer.spec.fmt.levels, dtype=torch.float64)[codes.long()]


def _weight_codes(layer) -> Tensor:
    return prepared(layer, "int_weight", lambda: weight_values(layer))


def integer_params(layer) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(bias_q (rows,) int64 or None, m0 (rows,), t (rows,))``: int32 bias and requantization multiplier."""
    w_scale = layer.scale.double().reshape(-1)
    x_scale, y_scale = layer.input_scale.double(), layer.output_scale.double()
    bias = None
    if layer.bias is not None:
        bias = torch.round(layer.bias.double() / (x_scale * w_scale)).clamp(*INT32).long()
    m0, t = quantize_multiplier(x_scale * w_scale / y_scale)
    return bias, m0, t


def _channels(layer) -> tuple[int, ...]:
    return (1, -1, 1, 1) if hasattr(layer, "conv") else (-1,)


def _accumulate(xq: Tensor, layer) -> Tensor:
    """Exact ``sum((xq - x_zp) * wq)`` as float64 integers: ``(..., rows)`` or ``(n, rows, h', w')``.

    In float32 when no partial sum can reach 2**24 (``max |x - x_zp| * max_row sum |w| < 2**24``: every
    product and partial sum is then an integer float32 holds exactly, in any summation order), which
    runs the fast float kernels; else in float64. Both give the same integers."""
    xi = xq.float() - layer.input_zero_point.float()  # zero padding of a conv = the real value 0
    l1 = prepared(layer, "int_weight_l1", lambda: float(_weight_codes(layer).abs().sum(1).max()))
    exact32 = float(xi.abs().max()) * l1 < 2**24 if xi.numel() else True
    dtype = torch.float32 if exact32 else torch.float64
    w = prepared(layer, f"int_weight_{dtype}", lambda: _weight_codes(layer).to(dtype))
    xi = xi.to(dtype)
    if not hasattr(layer, "conv"):
        return (xi @ w.T).double()
    c = layer.conv
    w = w.reshape(layer.weight_shape)
    return F.conv2d(xi, w, None, c["stride"], c["padding"], c["dilation"], c["groups"]).double()


def qlinear(xq: Tensor, layer) -> Tensor:
    """Output codes of a static layer for input codes ``xq``: ONNX QLinearMatMul (+ int32 bias) for
    ``QStaticLinear`` (``(..., cols) -> (..., rows)``), QLinearConv for ``QStaticConv2d`` (NCHW)."""
    bias, m0, t = integer_params(layer)
    acc = torch.round(_accumulate(xq, layer)).long()
    shape = _channels(layer)
    if bias is not None:
        acc = acc + bias.reshape(shape)
    fmt = layer.act_spec.fmt
    zp = layer.output_zero_point.long()
    yq = requantize(acc, m0.reshape(shape), t.reshape(shape), zp, fmt.qmin, fmt.qmax)
    return yq.to(fmt.torch_dtype)


def integer_to_float(xq: Tensor, layer) -> Tensor:
    """float32 output of a layer that does not requantize: ``float32(acc) * (x_s * w_s) + bias``."""
    shape = _channels(layer)
    scale = (layer.input_scale.float() * layer.scale.float().reshape(-1)).reshape(shape)
    y = _accumulate(xq, layer).float() * scale
    return y + layer.bias.float().reshape(shape) if layer.bias is not None else y


def static_forward(x: Tensor, layer) -> Tensor:
    """float ``x`` -> float output: quantize, the integer op, dequantize (or ``integer_to_float``)."""
    xq = quantize_activation(x, layer)
    if not layer.requantize_output:
        return integer_to_float(xq, layer).to(x.dtype)
    return dequantize_activation(qlinear(xq, layer), layer).to(x.dtype)


register_backend("static_linear", "reference", priority=0)(static_forward)
register_backend("static_conv2d", "reference", priority=0)(static_forward)
