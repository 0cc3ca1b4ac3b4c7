"""Per-layer bit widths learned jointly with the weights, under a model-size budget.

With ``QATConfig(bit_budget=B)`` every weight quantizer learns a real-valued bit width (``FakeQuantizer``
mode "bits"; ``lowbit.qat.train`` steps it at ``BITS_LR_SCALE`` times the learning rate: Adam moves a
parameter by about the learning rate per step, and a bit is a large step). ``bit_penalty`` is the size
term of the loss: ``relu(mean_bits - B)`` with the mean weighted by each layer's weight count, i.e. the
excess of the model's weight bytes over ``B / 8`` bytes per weight; below the budget the task loss alone
moves the widths, so small layers that matter climb and large ones give bits back. ``fix_bit_widths``
ends the learning: each layer gets an integer width (2..8) near its learned one, lowered greedily (the
layer rounded up the most first) until the weighted mean is within the budget, and trains on as
``int{b}`` with the same clipping range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowbit.core.errors import LowbitError
from lowbit.qat.fake import FakeQuantizer
from lowbit.qat.modules import qat_modules


def learned_bits(model: nn.Module) -> dict[str, tuple[FakeQuantizer, int]]:
    """fqn -> (weight quantizer still learning its bit width, weight count)."""
    return {
        f: (m.weight_fq, m.weight.numel())
        for f, m in qat_modules(model).items()
        if m.weight_fq.mode == "bits" and int(m.weight_fq.fixed_bits) == 0
    }


def bit_penalty(model: nn.Module, budget: float) -> Tensor:
    """``relu(weighted mean bit width - budget)`` over the layers still learning their width (0 if none)."""
    layers = learned_bits(model)
    if not layers:
        return torch.zeros(())
    bits = torch.stack([fq.bits() for fq, _ in layers.values()])
    counts = torch.tensor([float(n) for _, n in layers.values()])
    return torch.relu((bits * counts).sum() / counts.sum() - budget)


def mean_bits(model: nn.Module) -> float:
    """Weighted mean weight bit width of every training twin (learned widths as they stand)."""
    pairs = [(float(m.weight_fq.bits().detach()), m.weight.numel()) for m in qat_modules(model).values()]
    return sum(b * n for b, n in pairs) / max(1, sum(n for _, n in pairs))


@torch.no_grad()
def fix_bit_widths(model: nn.Module, budget: float) -> dict[str, int]:
    """Give every layer still learning its width an integer one within ``budget`` (module docstring);
    returns fqn -> bits."""
    layers = learned_bits(model)
    if not layers:
        return {}
    learned = {f: float(fq.bits().detach()) for f, (fq, _) in layers.items()}
    for f, b in learned.items():
        if not math.isfinite(b):  # before round(), which raises a bare ValueError on NaN
            raise LowbitError(f"{layers[f][0].name}: learned bit width is {b}")
    bits = {f: min(8, max(2, round(b))) for f, b in learned.items()}
    counts = {f: n for f, (_, n) in layers.items()}
    fixed_total = sum(m.weight.numel() * float(m.weight_fq.bits()) for f, m in qat_modules(model).items()
                      if f not in layers)  # fmt: skip
    total = sum(m.weight.numel() for m in qat_modules(model).values())

    def mean() -> float:
        return (fixed_total + sum(bits[f] * counts[f] for f in bits)) / total

    while mean() > budget + 1e-9:
        lowerable = [f for f in bits if bits[f] > 2]
        if not lowerable:
            raise LowbitError(f"a mean of {budget} weight bits is below the 2-bit floor ({mean():.2f})")
        f = max(lowerable, key=lambda f: (bits[f] - learned[f], -counts[f]))  # most rounded up first
        bits[f] -= 1
    for f, b in bits.items():
        layers[f][0].fix_bits(b)
    return bits
