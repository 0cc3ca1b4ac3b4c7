"""Pure math on tensors: weight quantization algorithms. No model walking here."""

from lowbit.algorithms.fold import fold_bn
from lowbit.algorithms.rtn import QuantizedTensor, rtn

__all__ = ["QuantizedTensor", "fold_bn", "rtn"]
