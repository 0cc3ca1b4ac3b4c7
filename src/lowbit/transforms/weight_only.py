"""Handler for ``WeightOnly``: swap Linear/Embedding for QLinear/QEmbedding.

Calibration-free methods (``rtn``, ``hqq``) round every layer on its own (``lowbit.transforms.swap``);
methods that need data (``gptq``, ``awq``, ``awq+gptq``, ``qat``) run block by block
(``lowbit.transforms.sequential``). Per-layer formats (``WeightOnly.layers``) are checked against the
model first (``check_layers``), before anything in it changes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.nn.modules import FLOAT_TO_Q
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.configs import WeightOnly
from lowbit.transforms.mappings import architecture, blocks_path
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.sequential import is_decoder, quantize_sequential
from lowbit.transforms.swap import rounding, swap_weights, weight_plan

SHOWN = 5  # bad ``layers`` entries named in the error, the rest counted


@register_handler(WeightOnly, distributed=True)
def weight_only(
    model: nn.Module, config: WeightOnly, calib, select: Selector, progress: bool, comm: Comm = SOLO
) -> QuantSummary:
    """Quantize every selected Linear and Embedding; tied weights are quantized once and shared.
    Distributed (``comm``), a decoder's blocks are dealt to the ranks as ``quantize_sequential``
    does; other models are rounded whole on every rank."""
    by_blocks = config.needs_calib or (comm.world > 1 and is_decoder(model))
    check_layers(model, config, select, by_blocks)
    if by_blocks:
        return quantize_sequential(model, config, calib, select, progress, comm)
    summary = QuantSummary(config)
    return swap_weights(model, weight_plan(config), select, summary, progress, rounding(config.method))


def check_layers(
    model: nn.Module, config: WeightOnly, select: Callable[[str], bool], by_blocks: bool = False
) -> None:
    """``LowbitError`` listing the ``config.layers`` entries (up to ``SHOWN``, with the reason) that
    name no layer the handler quantizes: a module the model lacks, one not a Linear/Embedding, one
    deselected by ``select`` (include/exclude, zero-size weights), an Embedding kept float, an
    Embedding inside the decoder blocks of a block-by-block run (``by_blocks``: only their Linears are
    rounded), or a layer tied to one quantized before it with another format (it takes that one's).
    Changes nothing; works on a model on the meta device (names, types and ties only)."""
    if not config.layers:
        return
    bad = _layer_problems(model, config, select, _blocks_prefix(model) if by_blocks else None)
    if bad:
        shown = "; ".join(f"{n!r}: {why}" for n, why in list(bad.items())[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise LowbitError(
            f"WeightOnly.layers names {len(bad)} layer(s) this model does not quantize: {shown}{more}"
        )


def _blocks_prefix(model: nn.Module) -> str:
    return blocks_path(model, architecture(getattr(model, "config", None))) + "."


def _layer_problems(
    model: nn.Module, config: WeightOnly, select: Callable[[str], bool], blocks: str | None
) -> dict[str, str]:
    """fqn -> why, for each ``config.layers`` entry ``check_layers`` refuses (in ``layers`` order)."""
    plan, mods = weight_plan(config), dict(model.named_modules())
    why: dict[str, str] = {}
    owners: dict[int, str] = {}  # id(weight) -> first quantized owner, as ``swap_weights`` shares ties
    for fqn, m in mods.items():
        if type(m) not in FLOAT_TO_Q:
            continue
        if not select(fqn):
            why[fqn] = "deselected (include/exclude, or a zero-size weight)"
        elif plan(m, fqn) is None:
            why[fqn] = "embeddings are kept float (quantize_embeddings=False)"
        elif blocks is not None and fqn.startswith(blocks) and type(m) is not nn.Linear:
            why[fqn] = "an Embedding inside the decoder blocks (only their Linears are quantized)"
        else:
            owner = owners.setdefault(id(m.weight), fqn)
            if owner != fqn and plan(m, fqn)[1] != plan(mods[owner], owner)[1]:
                why[fqn] = f"its weight is tied to {owner!r}, quantized first: give that one the entry"
    for fqn in config.layers:
        if fqn not in mods:
            why[fqn] = "no such module in the model"
        elif type(mods[fqn]) not in FLOAT_TO_Q:
            why[fqn] = f"a {type(mods[fqn]).__name__}, not a Linear or Embedding"
    return {fqn: why[fqn] for fqn in config.layers if fqn in why}
