"""Quantization-aware training: fake-quantized training twins, learned qparams, deployable results.

import lowbit
from lowbit import qat
config = qat.QATConfig(weights="int4", activation_bits=4)
qat.prepare(model, config, calib=batches)        # Linear/Conv2d -> training twins, ranges observed
qat.train(model, qat.shuffled(images, labels, batch_size=128), qat.TrainOptions(steps=2000))
qat.convert(model)                                # -> QStaticConv2d / QStaticLinear (integer-only)
lowbit.save(model, "out/w4a4")
"""

from lowbit.qat.config import QATConfig, parse_qat_scheme
from lowbit.qat.fake import FakeQuantizer, grad_scale, round_ste
from lowbit.qat.loss import HiddenMatch, Objective, cross_entropy, distillation, quantization_error
from lowbit.qat.modules import QATConv2d, QATConvBn2d, QATLinear
from lowbit.qat.prepare import convert, fake_quantizers, prepare, qat_modules
from lowbit.qat.trainer import TrainOptions, TrainResult, shuffled, train

__all__ = [
    "HiddenMatch",
    "Objective",
    "TrainOptions",
    "TrainResult",
    "cross_entropy",
    "distillation",
    "quantization_error",
    "shuffled",
    "train",
    "FakeQuantizer",
    "QATConfig",
    "parse_qat_scheme",
    "QATConv2d",
    "QATConvBn2d",
    "QATLinear",
    "convert",
    "fake_quantizers",
    "grad_scale",
    "prepare",
    "qat_modules",
    "round_ste",
]
