"""Handler for ``WeightOnly``: swap Linear/Embedding for QLinear/QEmbedding, weights by RTN."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import rtn
from lowbit.core.spec import QuantSpec
from lowbit.nn.modules import FLOAT_TO_Q, QuantizedWeightModule
from lowbit.transforms.configs import WeightOnly
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler

Plan = Callable[[nn.Module], "tuple[type[QuantizedWeightModule], QuantSpec] | None"]


@register_handler(WeightOnly)
def weight_only(
    model: nn.Module, config: WeightOnly, calib, select: Selector, progress: bool
) -> QuantSummary:
    """Quantize every selected Linear and Embedding; tied weights are quantized once and shared."""

    def plan(m: nn.Module):
        spec = config.embedding_spec() if isinstance(m, nn.Embedding) else config.linear_spec()
        return (FLOAT_TO_Q[type(m)], spec) if spec is not None else None

    return swap_weights(model, plan, select, QuantSummary(config), progress)


def swap_weights(
    model: nn.Module, plan: Plan, select: Selector, summary: QuantSummary, progress: bool
) -> QuantSummary:
    """Replace each selected Linear/Embedding ``m`` by ``cls`` with RTN weights, ``(cls, spec) = plan(m)``
    (None keeps it float). A weight tied to an earlier one is quantized once, by the first owner's spec."""
    targets = []
    for fqn, m in model.named_modules():
        if type(m) not in FLOAT_TO_Q or not select(fqn):
            continue
        choice = plan(m)
        if choice is None:
            summary.skipped[fqn] = "embeddings kept float by config"
            continue
        targets.append((fqn, m, *choice))
    done: dict[int, tuple[str, QuantizedWeightModule]] = {}  # id(float weight) -> first quantized owner
    for fqn, m, cls, spec in tqdm(targets, desc="quantize", unit="layer", disable=not progress):
        owner = done.get(id(m.weight))
        if owner is not None:
            q = cls.from_float(m, owner[1].spec)
            q.share_weight(owner[1])
            summary.tied[fqn] = owner[0]
        else:
            q = cls.from_float(m, spec)
            q.set_weight(rtn(m.weight.detach(), spec, name=f"{fqn}.weight"))
            done[id(m.weight)] = (fqn, q)
        if getattr(m, "bias", None) is not None:
            q.bias = m.bias.detach().clone()
        model.set_submodule(fqn, q)
        summary.quantized[fqn] = q.extra_repr()
    return summary
