"""Pure math on tensors: weight quantization algorithms. No model walking here."""

from lowbit.algorithms.awq import awq_clip, awq_scales
from lowbit.algorithms.bias_correction import ChannelMean, bias_shift
from lowbit.algorithms.fold import fold_bn
from lowbit.algorithms.gptq import HessianAccumulator, gptq
from lowbit.algorithms.hqq import hqq
from lowbit.algorithms.outliers import outlier_channels, split_columns
from lowbit.algorithms.rtn import QuantizedTensor, rtn
from lowbit.algorithms.smoothquant import smooth_scales

__all__ = [
    "ChannelMean",
    "HessianAccumulator",
    "QuantizedTensor",
    "awq_clip",
    "awq_scales",
    "bias_shift",
    "fold_bn",
    "gptq",
    "hqq",
    "outlier_channels",
    "rtn",
    "smooth_scales",
    "split_columns",
]
