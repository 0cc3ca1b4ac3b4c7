"""Quantized modules with plain buffers and tiny forwards."""

from lowbit.nn.dynamic import ACTIVATION_SPEC, QDynamicLinear
from lowbit.nn.modules import (
    FLOAT_TO_Q,
    QMODULES,
    QEmbedding,
    QLinear,
    QuantizedWeightModule,
    register_qmodule,
)

__all__ = [
    "ACTIVATION_SPEC",
    "FLOAT_TO_Q",
    "QMODULES",
    "QDynamicLinear",
    "QEmbedding",
    "QLinear",
    "QuantizedWeightModule",
    "register_qmodule",
]
