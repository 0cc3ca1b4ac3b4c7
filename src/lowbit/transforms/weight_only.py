"""Handler for ``WeightOnly``: swap Linear/Embedding for QLinear/QEmbedding.

Calibration-free methods (``rtn``, ``hqq``) round every layer on its own (``lowbit.transforms.swap``);
methods that need data (``gptq``, ``awq``, ``awq+gptq``) run block by block
(``lowbit.transforms.sequential``).
"""

from __future__ import annotations

from torch import nn

from lowbit.transforms.configs import WeightOnly
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.sequential import quantize_sequential
from lowbit.transforms.swap import rounding, swap_weights, weight_plan


@register_handler(WeightOnly)
def weight_only(
    model: nn.Module, config: WeightOnly, calib, select: Selector, progress: bool
) -> QuantSummary:
    """Quantize every selected Linear and Embedding; tied weights are quantized once and shared."""
    if config.needs_calib:
        return quantize_sequential(model, config, calib, select, progress)
    summary = QuantSummary(config)
    return swap_weights(model, weight_plan(config), select, summary, progress, rounding(config.method))
