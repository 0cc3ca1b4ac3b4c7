"""Handler for ``WeightOnly``: swap Linear/Embedding for QLinear/QEmbedding.

Calibration-free methods (``rtn``, ``hqq``) round every layer on its own (``lowbit.transforms.swap``);
methods that need data (``gptq``, ``awq``, ``awq+gptq``) run block by block
(``lowbit.transforms.sequential``).
"""

from __future__ import annotations

from torch import nn

from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.configs import WeightOnly
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.sequential import is_decoder, quantize_sequential
from lowbit.transforms.swap import rounding, swap_weights, weight_plan


@register_handler(WeightOnly, distributed=True)
def weight_only(
    model: nn.Module, config: WeightOnly, calib, select: Selector, progress: bool, comm: Comm = SOLO
) -> QuantSummary:
    """Quantize every selected Linear and Embedding; tied weights are quantized once and shared.
    Distributed (``comm``), a decoder's blocks are dealt to the ranks as ``quantize_sequential``
    does; other models are rounded whole on every rank."""
    if config.needs_calib or (comm.world > 1 and is_decoder(model)):
        return quantize_sequential(model, config, calib, select, progress, comm)
    summary = QuantSummary(config)
    return swap_weights(model, weight_plan(config), select, summary, progress, rounding(config.method))
