"""Per-architecture layer mappings, as data: where the decoder blocks are, and inside a block which
module produces the input of which Linears (for AWQ / SmoothQuant scale folding).

A ``ScaleMap(producer, consumers)`` says: every Linear in ``consumers`` reads exactly what
``producer`` outputs. An equivalence scale ``s (in,)`` then folds as ``consumer.weight[:, j] *= s[j]``
and ``producer`` output ``/= s`` (a norm's weight and bias, or a Linear's output rows and bias), so
the float block computes the same function (``lowbit.algorithms.smoothquant`` has the arithmetic).

| model_type                 | blocks         | scale maps (producer -> consumers)                        |
|----------------------------|----------------|-----------------------------------------------------------|
| llama (SmolLM2), mistral,  | `model.layers` | input_layernorm -> q, k, v; v -> o;                       |
| qwen2, qwen3               |                | post_attention_layernorm -> gate, up; up -> down          |
| gemma                      | `model.layers` | as llama; norms compute ``x * (1 + w)``                   |
| gemma2, gemma3_text        | `model.layers` | as llama with pre_feedforward_layernorm -> gate, up       |

``v -> o`` (and any map) applies only when shapes allow: with grouped-query attention ``v_proj``
has fewer outputs than ``o_proj`` has inputs (one value head feeds several query heads), so it is
skipped. Gemma's RMSNorm multiplies by ``1 + w``: folding ``s`` sets ``w' = (1 + w) / s - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.smoothquant import fold_into_linear_rows, fold_into_norm, scale_columns
from lowbit.core.errors import LowbitError


@dataclass(frozen=True)
class ScaleMap:
    """``producer`` outputs the input of every module in ``consumers`` (names relative to a block)."""

    producer: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """Where the decoder blocks are (from the ``*ForCausalLM`` root) and their scale maps.

    norm_offset: the block norms compute ``normalized(x) * (norm_offset + w)`` (1.0 for Gemma)."""

    blocks: str
    scale_maps: tuple[ScaleMap, ...]
    norm_offset: float = 0.0


_ATTN = (
    ScaleMap("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMap("self_attn.v_proj", ("self_attn.o_proj",)),
)
_DOWN = ScaleMap("mlp.up_proj", ("mlp.down_proj",))
LLAMA_MAPS = (*_ATTN, ScaleMap("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN)
GEMMA2_MAPS = (*_ATTN, ScaleMap("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _DOWN)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", LLAMA_MAPS),
    "mistral": Architecture("model.layers", LLAMA_MAPS),
    "qwen2": Architecture("model.layers", LLAMA_MAPS),
    "qwen3": Architecture("model.layers", LLAMA_MAPS),
    "gemma": Architecture("model.layers", LLAMA_MAPS, norm_offset=1.0),
    "gemma2": Architecture("model.layers", GEMMA2_MAPS, norm_offset=1.0),
    "gemma3_text": Architecture("model.layers", GEMMA2_MAPS, norm_offset=1.0),
}


def architecture(config) -> Architecture:
    """The ``Architecture`` of a Hugging Face config (``model.config``) by its ``model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        what = f"model_type {model_type!r}" if model_type else "a model without a Hugging Face config"
        raise LowbitError(
            f"block-by-block quantization does not know {what}; known: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def blocks_path(model: nn.Module, arch: Architecture) -> str:
    """Dotted path of the block ``ModuleList`` in ``model`` (a ``*ForCausalLM`` or its base model)."""
    for path in (arch.blocks, arch.blocks.split(".", 1)[-1]):
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found):
            return path
    raise LowbitError(f"no decoder blocks at {arch.blocks!r} in {type(model).__name__}")


def resolve(block: nn.Module, arch: Architecture) -> list[tuple[str, nn.Module, list[tuple[str, nn.Linear]]]]:
    """The scale maps that apply to ``block``: ``(producer name, producer, [(name, consumer Linear)])``,
    in ``arch`` order. A map is left out when a module is missing, a consumer is not an ``nn.Linear``,
    or the producer's output width differs from a consumer's input width (e.g. GQA's v -> o)."""
    out = []
    for m in arch.scale_maps:
        try:
            producer = block.get_submodule(m.producer)
            consumers = [(c, block.get_submodule(c)) for c in m.consumers]
        except AttributeError:
            continue
        width = _output_width(producer)
        if width is None or any(not isinstance(c, nn.Linear) or c.in_features != width for _, c in consumers):
            continue
        out.append((m.producer, producer, consumers))
    return out


def _output_width(producer: nn.Module) -> int | None:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    weight = getattr(producer, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor, norm_offset: float) -> None:
    """Apply equivalence scale ``s (in,)`` in place: consumer columns ``*= s``, producer output ``/= s``.

    ``producer``: an ``nn.Linear`` (output rows and bias) or a norm with a 1-d ``weight`` (and
    optional ``bias``) computing ``normalized(x) * (norm_offset + weight) + bias``."""
    if isinstance(producer, nn.Linear):
        w, b = fold_into_linear_rows(producer.weight, producer.bias, s)
    else:
        bias = getattr(producer, "bias", None)
        w, b = fold_into_norm(producer.weight.double() + norm_offset, bias, s)
        w = (w - norm_offset).to(producer.weight.dtype)
    producer.weight.copy_(w)
    if b is not None:
        producer.bias.copy_(b)
    for c in consumers:
        c.weight.copy_(scale_columns(c.weight, s))
