"""Quantized modules with plain buffers and tiny forwards."""

from lowbit.nn.modules import (
    FLOAT_TO_Q,
    QMODULES,
    QEmbedding,
    QLinear,
    QuantizedWeightModule,
    register_qmodule,
)

__all__ = ["FLOAT_TO_Q", "QMODULES", "QEmbedding", "QLinear", "QuantizedWeightModule", "register_qmodule"]
