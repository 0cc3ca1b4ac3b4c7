"""Handler for ``Int8Dynamic``: Linear -> QDynamicLinear (W8A8), Embedding -> int8 per-row QEmbedding."""

from __future__ import annotations

from torch import nn

from lowbit.nn.dynamic import QDynamicLinear
from lowbit.nn.modules import FLOAT_TO_Q
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.configs import Int8Dynamic
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.swap import swap_weights


@register_handler(Int8Dynamic, distributed=True)
def int8_dynamic(
    model: nn.Module, config: Int8Dynamic, calib, select: Selector, progress: bool, comm: Comm = SOLO
) -> QuantSummary:
    """Linear layers run W8A8; embeddings (and a head tied to one) are int8 weight-only. Distributed
    (``comm``), every rank rounds the whole model (round-to-nearest: nothing worth dealing out)."""

    def plan(m: nn.Module, fqn: str):
        if isinstance(m, nn.Embedding):
            spec = config.embedding_spec()
            return (FLOAT_TO_Q[nn.Embedding], spec) if spec is not None else None
        return QDynamicLinear, config.linear_spec()

    return swap_weights(model, plan, select, QuantSummary(config), progress)
