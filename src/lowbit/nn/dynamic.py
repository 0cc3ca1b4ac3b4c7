"""``QDynamicLinear``: W8A8 with dynamic activations.

Weights are stored like ``QLinear``'s (int8 symmetric, one scale per output channel); at run time each
row of the input (each token) is quantized to int8 with its own scale ``amax / 127``
(``ACTIVATION_SPEC``), and the product accumulates in int32 on fast backends.
"""

from __future__ import annotations

import torch

from lowbit.kernels import dispatch
from lowbit.kernels.reference import DYNAMIC_ACTIVATIONS as ACTIVATION_SPEC
from lowbit.nn.modules import QLinear, register_qmodule


@register_qmodule(None)
class QDynamicLinear(QLinear):
    """``y = dequant(quant(x)) @ W.T + b``, ``x`` quantized per token at run time."""

    act_spec = ACTIVATION_SPEC

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("dynamic_linear", self, x.device, self.backend)(x, self)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activations int8 per token (dynamic)"
