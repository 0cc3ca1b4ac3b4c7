"""Training twins of Linear and Conv2d: float weights, fake-quantized in every forward.

| module        | forward (``fq``: ``FakeQuantizer``)                                                  |
|---------------|--------------------------------------------------------------------------------------|
| `QATLinear`   | ``linear(fq_in(x), fq_w(W), b)``                                                     |
| `QATConv2d`   | ``conv2d(fq_in(x), fq_w(W), b)`` (depthwise and grouped included)                    |
| `QATConvBn2d` | a Conv2d and the BatchNorm2d after it, with simulated folding: the weight is folded  |
|               | with the running statistics, ``W' = W * gamma / sqrt(var + eps)``, then quantized;   |
|               | training (statistics not frozen) rescales the conv output back and runs the          |
|               | BatchNorm on batch statistics (Krishnamoorthi 2018, sec. 3.2), so the running        |
|               | statistics keep learning; eval or frozen: ``conv2d(fq_in(x), fq_w(W'), b')`` with    |
|               | ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, which is what ``convert``       |
|               | deploys                                                                              |

``fq_in`` is None for weight-only training. ``deploy_weight()`` returns the float weight the weight
quantizer sees (``W`` or ``W'``) and the bias that goes with it. With quantized inputs the bias is
rounded (straight-through) to the grid the integer op holds it on, multiples of ``x_scale * w_scale[c]``
(int32 codes; ``integer_bias``), so the deployed layer and ONNX Runtime's add exactly that bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.algorithms.fold import fold_bn
from lowbit.nn.static import CONV_KEYS
from lowbit.qat.fake import MIN_SCALE, FakeQuantizer, round_ste, weight_rows

MIN_FACTOR = 1e-6  # |gamma / std| floor of the training forward, which divides by it (a dead channel)


class QATModule(nn.Module):
    """Base: ``weight_fq`` (weights as rows, see ``weight_rows``) and ``input_fq`` (or None)."""

    group_size: int | None = None

    def _init_quantizers(self, weight_fq: FakeQuantizer, input_fq: FakeQuantizer | None, group: int | None):
        self.weight_fq, self.input_fq, self.group_size = weight_fq, input_fq, group

    def deploy_weight(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def quantized_weight(self, weight: Tensor) -> Tensor:
        """``weight`` fake-quantized (same shape)."""
        return self.weight_fq(weight_rows(weight, self.group_size)).reshape(weight.shape)

    def integer_bias(self, bias: Tensor | None) -> Tensor | None:
        """``bias`` on the int32 grid of the integer op (module docstring); unchanged without input
        quantization or before the input range is known."""
        fq = self.input_fq
        if bias is None or fq is None or fq.observer is not None or not bool(fq.initialized):
            return bias
        step = fq.scale.clamp_min(MIN_SCALE) * self.weight_fq.scale.clamp_min(MIN_SCALE).reshape(-1)
        return round_ste(bias / step) * step

    def _input(self, x: Tensor) -> Tensor:
        return self.input_fq(x) if self.input_fq is not None else x


class QATLinear(QATModule):
    """``nn.Linear`` trained with fake-quantized weight and input (shares the Linear's parameters)."""

    def __init__(self, linear: nn.Linear, weight_fq: FakeQuantizer, input_fq: FakeQuantizer | None,
                 group_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._init_quantizers(weight_fq, input_fq, group_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._input(x), self.quantized_weight(self.weight), self.integer_bias(self.bias))


def _conv_args(conv: dict) -> dict:
    return {k: conv[k] for k in ("stride", "padding", "dilation", "groups")}


class QATConv2d(QATModule):
    """``nn.Conv2d`` (zero padding) trained with fake-quantized weight and input."""

    def __init__(self, conv: nn.Conv2d, weight_fq: FakeQuantizer, input_fq: FakeQuantizer | None) -> None:
        super().__init__()
        self.conv = {k: getattr(conv, k) for k in CONV_KEYS}  # what convert deploys
        self.weight, self.bias = conv.weight, conv.bias
        self._init_quantizers(weight_fq, input_fq, None)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.quantized_weight(self.weight), self.integer_bias(self.bias)
        return F.conv2d(self._input(x), weight, bias, **_conv_args(self.conv))


class QATConvBn2d(QATModule):
    """Conv2d followed by BatchNorm2d, trained with simulated folding (module docstring).

    ``frozen`` (a buffer): BatchNorm statistics stop updating and the forward uses the running ones, as
    deployed; ``freeze_bn()`` sets it.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_fq: FakeQuantizer,
                 input_fq: FakeQuantizer | None) -> None:  # fmt: skip
        super().__init__()
        self.conv, self.bn = {k: getattr(conv, k) for k in CONV_KEYS}, bn
        self.weight, self.bias = conv.weight, conv.bias
        self.register_buffer("frozen", torch.tensor(False))
        self._init_quantizers(weight_fq, input_fq, None)

    def freeze_bn(self) -> None:
        self.frozen.fill_(True)

    def _factor(self) -> Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel."""
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def deploy_weight(self) -> tuple[Tensor, Tensor]:
        """``(W', b')``: BatchNorm folded with its running statistics (``lowbit.algorithms.fold``, the
        rule post-training folding uses; differentiable)."""
        bn = self.bn
        return fold_bn(self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

    def forward(self, x: Tensor) -> Tensor:
        x, args = self._input(x), _conv_args(self.conv)
        if not self.training or bool(self.frozen):
            weight, bias = self.deploy_weight()
            return F.conv2d(x, self.quantized_weight(weight), self.integer_bias(bias), **args)
        factor = self._factor()
        floor = torch.where(factor < 0, -MIN_FACTOR, MIN_FACTOR)
        factor = torch.where(factor.abs() < MIN_FACTOR, floor, factor)
        weight = self.quantized_weight(self.weight * factor.reshape(-1, 1, 1, 1))
        y = F.conv2d(x, weight, None, **args) / factor.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self.bn(y)


QAT_MODULES = (QATLinear, QATConv2d, QATConvBn2d)


def qat_modules(model: nn.Module) -> dict[str, QATModule]:
    """fqn -> every training twin in ``model``."""
    return {f: m for f, m in model.named_modules() if isinstance(m, QAT_MODULES)}
