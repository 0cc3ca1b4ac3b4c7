"""``QDynamicLinear``: W8A8 with dynamic activations.

Weights are stored like ``QLinear``'s (int8 symmetric, one scale per output channel); at run time each
row of the input (each token) is quantized to uint8 with its own scale and zero point (its range
``[min(x, 0), max(x, 0)]`` over 255 steps, ``ACTIVATION_SPEC``), and the product accumulates in int32
on fast backends.
"""

from __future__ import annotations

from lowbit.kernels.reference import DYNAMIC_ACTIVATIONS as ACTIVATION_SPEC
from lowbit.nn.modules import QLinear, register_qmodule


@register_qmodule(None)
class QDynamicLinear(QLinear):
    """``y = dequant(quant(x)) @ W.T + b``, ``x`` quantized per token at run time."""

    KERNEL_OP = "dynamic_linear"  # QLinear.forward dispatches on it
    act_spec = ACTIVATION_SPEC

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activations int8 per token (dynamic)"
