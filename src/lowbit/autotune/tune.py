"""``tune``: choose each layer's weight format so the model meets a budget at the least predicted loss.

1. Sensitivity: the diagonal Fisher of the calibration loss per selected Linear (``fisher_diagonals``),
   then every candidate format's predicted loss increase per layer (``weight_errors``, "fisher").
2. Costs: each candidate's real checkpoint bytes on that layer (``Candidate.nbytes``).
3. Allocation: the exact least-loss choice under the budget (``lowbit.algorithms.allocate``): a size
   (bytes, or bits per weight over the planned layers, scales and zero points counted) or a predicted
   loss increase.

The result is a ``Plan``: a ``WeightOnly`` whose ``layers`` holds one entry per planned layer, applied by
``quantize_`` like any config. Linears whose weight is shared with another module (a tied LM head) and
Linears no candidate fits are left to the base config and not counted in the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.algorithms.allocate import Choice, Frontier, frontier
from lowbit.autotune.candidates import DEFAULT_CANDIDATES, Candidate, parse_candidates
from lowbit.autotune.sensitivity import (
    LossFn,
    fisher_diagonals,
    lm_loss,
    rows_cols,
    weight_errors,
    weight_layers,
)
from lowbit.core.errors import LowbitError
from lowbit.transforms.configs import StaticW8A8, WeightOnly
from lowbit.transforms.quantize import Selector

Base = WeightOnly | StaticW8A8  # the configs a plan extends


def scale_dtype(base: Base) -> str:
    """Storage dtype of the weight scales ``base`` gives (static layers: float32)."""
    return getattr(base, "scale_dtype", "float32")


def check_candidates(base: Base, candidates: Sequence[Candidate]) -> None:
    """``LowbitError`` for candidates ``base`` cannot give a layer: static layers take symmetric
    per-channel weights only (``w4-sym``, ``w8-sym``)."""
    if isinstance(base, StaticW8A8):
        bad = [c.name for c in candidates if c.group_size or not c.symmetric]
        if bad:
            raise LowbitError(
                f"static layers take symmetric per-channel weights (w4-sym, w8-sym); not {', '.join(bad)}"
            )


@dataclass(frozen=True)
class Budget:
    """Exactly one of: ``max_bytes`` (planned layers' stored bytes), ``bits`` (mean bits per weight over
    the planned layers, scales and zero points counted), ``max_loss`` (predicted loss increase, in the
    loss's unit: nats per token for a language model)."""

    max_bytes: int | None = None
    bits: float | None = None
    max_loss: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("max_bytes", "bits", "max_loss") if getattr(self, k) is not None]
        if len(given) != 1:
            raise LowbitError(f"give exactly one budget (max_bytes, bits or max_loss), got {given or 'none'}")
        value = getattr(self, given[0])
        if not math.isfinite(value) or value <= 0:
            raise LowbitError(f"budget {given[0]} must be a positive number, got {value!r}")


@dataclass
class Plan:
    """A chosen mix: ``config`` (apply with ``quantize_``), each planned layer's candidate, and the table
    it was chosen from. bytes / bits_per_weight: of the planned layers; predicted_loss: the sum of the
    chosen candidates' predicted loss increases."""

    config: Base
    layers: dict[str, Candidate]
    params: dict[str, int]
    bytes: int
    predicted_loss: float
    sensitivity: dict[str, dict[str, dict[str, float]]]
    left_to_base: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / sum(self.params.values())

    def counts(self) -> dict[str, int]:
        """Candidate name -> number of layers given it."""
        out: dict[str, int] = {}
        for c in self.layers.values():
            out[c.name] = out.get(c.name, 0) + 1
        return dict(sorted(out.items()))


@dataclass
class Table:
    """Per-layer costs and predicted losses of every fitting candidate; ``frontier`` over them."""

    names: list[str]
    options: list[list[Candidate]]
    costs: list[list[int]]
    losses: list[list[float]]
    params: dict[str, int]
    sensitivity: dict[str, dict[str, dict[str, float]]]
    left_to_base: dict[str, str]
    frontier: Frontier

    def plan(self, choice: Choice, base: Base) -> Plan:
        layers = {n: opts[k] for n, opts, k in zip(self.names, self.options, choice.picks, strict=True)}
        if isinstance(base, StaticW8A8):
            config = replace(base, layer_bits={n: c.bits for n, c in layers.items()})
        else:
            config = replace(base, layers={n: c.entry() for n, c in layers.items()})
        return Plan(
            config, layers, self.params, choice.cost, choice.loss, self.sensitivity, self.left_to_base
        )


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _planned(model: nn.Module, select: Callable[[str], bool], candidates: Sequence[Candidate]):
    """(layers to plan, fqn -> why a selected Linear is left to the base config)."""
    tied, left, layers = _tied(model), {}, {}
    for n, m in weight_layers(model, select).items():
        if id(m.weight) in tied:
            left[n] = "weight shared with another module: follows the base config"
        elif not any(c.fits(rows_cols(m.weight)) for c in candidates):
            left[n] = f"no candidate fits its shape {tuple(m.weight.shape)}: follows the base config"
        else:
            layers[n] = m
    if not layers:
        raise LowbitError("no Linear or Conv2d layer to plan (check the model and include/exclude patterns)")
    return layers, left


def sensitivity_table(
    model: nn.Module,
    calib: Sequence,
    candidates: Sequence[Candidate | str] = DEFAULT_CANDIDATES,
    *,
    base: Base | None = None,
    loss_fn: LossFn = lm_loss,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> Table:
    """Steps 1-2 of the module docstring on ``model`` (left unchanged) with calibration batches ``calib``."""
    base = base or WeightOnly()
    cands = [c if isinstance(c, Candidate) else parse_candidates([c])[0] for c in candidates]
    check_candidates(base, cands)
    layers, left = _planned(model, Selector(include, exclude), cands)
    fisher = fisher_diagonals(model, calib, loss_fn, layers, progress)
    errors = weight_errors(layers, cands, fisher, scale_dtype(base))
    del fisher
    names = list(layers)
    options = [[c for c in cands if c.name in errors[n]] for n in names]
    costs = [
        [c.nbytes(rows_cols(layers[n].weight), scale_dtype(base)) for c in opts]
        for n, opts in zip(names, options, strict=True)
    ]
    losses = [[errors[n][c.name]["fisher"] for c in opts] for n, opts in zip(names, options, strict=True)]
    params = {n: layers[n].weight.numel() for n in names}
    return Table(names, options, costs, losses, params, errors, left, frontier(costs, losses))


def choose(table: Table, budget: Budget, base: Base | None = None) -> Plan:
    """The least-loss plan of ``table`` within ``budget`` (cheapest plan for a loss budget)."""
    base = base or WeightOnly()
    if budget.max_loss is not None:
        return table.plan(table.frontier.cheapest(budget.max_loss), base)
    max_bytes = budget.max_bytes
    if budget.bits is not None:
        max_bytes = math.floor(budget.bits * sum(table.params.values()) / 8)
    try:
        return table.plan(table.frontier.at_most(max_bytes), base)
    except LowbitError:
        least = 8.0 * table.frontier.min_cost / sum(table.params.values())
        raise LowbitError(
            f"no plan fits {max_bytes} bytes ({8.0 * max_bytes / sum(table.params.values()):.3f} bits per "
            f"weight): the smallest reachable is {table.frontier.min_cost} bytes ({least:.3f} bits per "
            "weight, every layer at its smallest candidate); raise the budget or add a smaller candidate"
        ) from None


def tune(
    model: nn.Module,
    calib: Sequence,
    budget: Budget,
    *,
    base: Base | None = None,
    candidates: Sequence[Candidate | str] = DEFAULT_CANDIDATES,
    loss_fn: LossFn = lm_loss,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> Plan:
    """Measure, cost and allocate (module docstring): the plan for ``budget``. ``base``: the config the
    plan extends (method, scale dtype; its own bits/group apply to layers not planned)."""
    opts = {"base": base, "loss_fn": loss_fn, "include": include, "exclude": exclude, "progress": progress}
    with torch.enable_grad():
        table = sensitivity_table(model, calib, candidates, **opts)
    return choose(table, budget, base)
