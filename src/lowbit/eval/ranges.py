"""Activation ranges per layer: what each Linear / Conv2d / quantized layer receives on real data, and for
layers with a static input scale how much of it falls outside the range their int8 codes can hold.

``activation_ranges(model, batches)`` runs ``batches`` under forward hooks and returns, per layer (fqn):
the input's min and max, its 0.1 / 99.9 percentiles and a 32-bin histogram (both from a uniform random
sample of at most ``sample`` values per layer, seeded), and for static layers (``StaticActivations``)
the representable input range ``[(qmin - zp) * s, (qmax - zp) * s]`` and the fraction of input values
outside it (counted over every value, not sampled): the values the layer clips. Inside a chain of static
layers each input is the previous layer's requantized output, already within range; clipping shows where
float values enter a static layer (the model's input, a float residual or norm output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.nn.modules import QEmbedding, QuantizedWeightModule
from lowbit.nn.static import StaticActivations

BINS = 32


@dataclass
class LayerRange:
    """One layer's input on the data: ``values`` seen; ``low``/``high`` (min, max); ``p001``/``p999`` (0.1 and
    99.9 percentiles, from the sample); ``hist`` (``BINS`` counts over [low, high], from the sample);
    static layers: ``representable`` (lo, hi) and ``clipped`` (fraction of values outside it)."""

    name: str
    values: int
    low: float
    high: float
    p001: float
    p999: float
    hist: list[int]
    representable: tuple[float, float] | None = None
    clipped: float | None = None


class _Tracker:
    def __init__(self, module: nn.Module, sample: int, gen: torch.Generator) -> None:
        self.sample, self.gen = sample, gen
        self.values, self.low, self.high, self.outside = 0, float("inf"), float("-inf"), 0
        self.kept: list[torch.Tensor] = []
        self.bounds = _representable(module) if isinstance(module, StaticActivations) else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        self.values += x.numel()
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        if self.bounds is not None:
            self.outside += int(((x < self.bounds[0]) | (x > self.bounds[1])).sum())
        take = min(x.numel(), self.sample)
        self.kept.append(x[torch.randint(0, x.numel(), (take,), generator=self.gen)])

    def result(self, name: str) -> LayerRange:
        kept = torch.cat(self.kept)
        kept = kept[torch.randperm(len(kept), generator=self.gen)[: self.sample]]
        p001, p999 = torch.quantile(kept, torch.tensor([0.001, 0.999])).tolist()
        hist = torch.histc(kept, BINS, self.low, self.high if self.high > self.low else self.low + 1)
        clipped = None if self.bounds is None else self.outside / self.values
        return LayerRange(name, self.values, self.low, self.high, p001, p999, [int(c) for c in hist],
                          self.bounds, clipped)  # fmt: skip


def _representable(module: StaticActivations) -> tuple[float, float]:
    fmt = module.act_spec.fmt
    s, zp = float(module.input_scale), float(module.input_zero_point)
    return ((fmt.qmin - zp) * s, (fmt.qmax - zp) * s)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Conv2d, QuantizedWeightModule)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not isinstance(m, QEmbedding)}


def activation_ranges(
    model: nn.Module,
    batches: Iterable,
    forward: Callable | None = None,
    sample: int = 65536,
    seed: int = 0,
) -> list[LayerRange]:
    """Per layer, in module order, the ranges of the module docstring over ``batches``; ``forward(model,
    batch)`` runs one batch (default ``model(batch)``). The model is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    layers = _layers(model)
    if not layers:
        raise LowbitError("the model has no Linear, Conv2d or quantized layer to record ranges of")
    trackers = {n: _Tracker(m, sample, gen) for n, m in layers.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, t=trackers[n]: t.add(args[0]))
        for n, m in layers.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                (forward or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
    ranges = [t.result(n) for n, t in trackers.items() if t.values]
    if not ranges:
        raise LowbitError("no batch reached a layer: give at least one batch the model takes")
    return ranges
