"""Quantized modules with plain buffers and tiny forwards."""

from lowbit.nn.dynamic import ACTIVATION_SPEC, QDynamicLinear
from lowbit.nn.modules import (
    FLOAT_TO_Q,
    QMODULES,
    QEmbedding,
    QLinear,
    QuantizedModule,
    QuantizedWeightModule,
    register_qmodule,
)
from lowbit.nn.outliers import QLinearOutlier
from lowbit.nn.static import (
    ACTIVATION_SPECS,
    STATIC_FLOAT_TO_Q,
    WEIGHT_SPEC,
    Add,
    QStaticAdd,
    QStaticConv2d,
    QStaticLinear,
    StaticActivations,
)

__all__ = [
    "ACTIVATION_SPECS",
    "STATIC_FLOAT_TO_Q",
    "WEIGHT_SPEC",
    "Add",
    "QStaticAdd",
    "QStaticConv2d",
    "QStaticLinear",
    "StaticActivations",
    "ACTIVATION_SPEC",
    "FLOAT_TO_Q",
    "QMODULES",
    "QDynamicLinear",
    "QEmbedding",
    "QLinear",
    "QLinearOutlier",
    "QuantizedModule",
    "QuantizedWeightModule",
    "register_qmodule",
]
