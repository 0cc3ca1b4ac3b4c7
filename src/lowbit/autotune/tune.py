"""``tune``: choose each layer's weight format so the model meets a budget at the least predicted loss.

1. Sensitivity, ``measure="fisher"``: the diagonal Fisher of the calibration loss per selected layer
   (``fisher_diagonals``), then every candidate format's predicted loss increase per layer
   (``weight_errors``, "fisher"). ``measure="measured"``: the calibration loss increase measured with
   only that layer rounded to that candidate (``one_layer_losses``, RTN; negative noise counts as 0);
   ``measure="kl"``: the output distribution's KL divergence from the float model's in the same setting
   (``one_layer_kl``). Both take one forward pass over ``calib`` per layer and candidate.
2. Costs: each candidate's real checkpoint bytes on that layer (``Candidate.nbytes``).
3. Allocation: the exact least-loss choice under the budget (``lowbit.algorithms.allocate``): a size
   (bytes, or bits per weight over the planned layers, scales and zero points counted), a latency
   (summed per-call microseconds of the planned Linears at one row, measured on this machine:
   ``lowbit.autotune.latency``), or the cheapest choice within a predicted loss increase.

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
from lowbit.autotune.latency import candidate_latencies
from lowbit.autotune.sensitivity import (
    LogitsFn,
    LossFn,
    fisher_diagonals,
    lm_logits,
    lm_loss,
    one_layer_kl,
    one_layer_losses,
    rows_cols,
    weight_errors,
    weight_layers,
)
from lowbit.core.errors import LowbitError
from lowbit.transforms.configs import INT_ONLY_METHODS, StaticW8A8, WeightOnly
from lowbit.transforms.quantize import Selector

Base = WeightOnly | StaticW8A8  # the configs a plan extends


MEASURES = ("fisher", "measured", "kl")  # sensitivity_table(measure=...)


def scale_dtype(base: Base) -> str:
    """Storage dtype of the weight scales ``base`` gives (static layers: float32)."""
    return getattr(base, "scale_dtype", "float32")


def check_candidates(base: Base, candidates: Sequence[Candidate]) -> None:
    """``LowbitError`` for candidates ``base`` cannot give a layer: static layers take symmetric
    per-channel int weights only (``w4-sym``, ``w8-sym``); methods hqq and qat int formats only."""
    if isinstance(base, StaticW8A8):
        bad = [c.name for c in candidates if c.group_size or not c.symmetric or c.format != "int"]
        if bad:
            raise LowbitError(
                f"static layers take symmetric per-channel weights (w4-sym, w8-sym); not {', '.join(bad)}"
            )
    elif base.method in INT_ONLY_METHODS:
        bad = [c.name for c in candidates if c.format != "int"]
        if bad:
            raise LowbitError(
                f"method {base.method} fits integer grids only; candidates {', '.join(bad)} need method "
                "rtn, gptq, awq or awq+gptq"
            )


KINDS = ("max_bytes", "bits", "max_loss", "max_latency_us")  # of a Budget


@dataclass(frozen=True)
class Budget:
    """Exactly one of: ``max_bytes`` (planned layers' stored bytes), ``bits`` (mean bits per weight over
    the planned layers, scales and zero points counted), ``max_loss`` (predicted loss increase, in the
    loss's unit: nats per token for a language model), ``max_latency_us`` (summed microseconds per call
    of the planned Linears at one activation row, ``lowbit.autotune.latency``)."""

    max_bytes: int | None = None
    bits: float | None = None
    max_loss: float | None = None
    max_latency_us: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise LowbitError(f"give exactly one budget ({', '.join(KINDS)}), got {given or 'none'}")
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
    latency_us: float | None = None  # summed per-call latency of the planned layers, when measured

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
    """Per-layer costs (bytes) and predicted losses of every fitting candidate; ``frontier`` over them.
    ``latency_us`` (after ``add_latencies``): per-call microseconds, with ``latency_frontier`` over them."""

    names: list[str]
    options: list[list[Candidate]]
    costs: list[list[int]]
    losses: list[list[float]]
    params: dict[str, int]
    sensitivity: dict[str, dict[str, dict[str, float]]]
    left_to_base: dict[str, str]
    frontier: Frontier
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    latency_us: list[list[float]] | None = None
    latency_frontier: Frontier | None = None

    def add_latencies(self, scale_dtype: str = "float16", batch: int = 1, advice=None) -> None:
        """Each option's latency at ``batch`` rows (``candidate_latencies``: this machine's advice cache,
        measured where missing), and the least-loss frontier over latency (costs in nanoseconds)."""
        self.latency_us = candidate_latencies(self.shapes, self.options, scale_dtype, batch, advice)
        ns = [[max(1, round(1000 * t)) for t in row] for row in self.latency_us]
        self.latency_frontier = frontier(ns, self.losses)

    def plan(self, choice: Choice, base: Base) -> Plan:
        picks = list(zip(self.names, self.options, choice.picks, strict=True))
        layers = {n: opts[k] for n, opts, k in picks}
        if isinstance(base, StaticW8A8):
            config = replace(base, layer_bits={n: c.bits for n, c in layers.items()})
        else:
            config = replace(base, layers={n: c.entry() for n, c in layers.items()})
        nbytes = sum(row[k] for row, k in zip(self.costs, choice.picks, strict=True))
        latency = None
        if self.latency_us is not None:
            latency = sum(row[k] for row, k in zip(self.latency_us, choice.picks, strict=True))
        return Plan(config, layers, self.params, nbytes, choice.loss, self.sensitivity, self.left_to_base,
                    latency)  # fmt: skip


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
    measure: str = "fisher",
    logits_fn: LogitsFn = lm_logits,
) -> Table:
    """Steps 1-2 of the module docstring on ``model`` (left unchanged) with calibration batches ``calib``;
    ``measure``: one of ``MEASURES`` (step 1); ``logits_fn``: the model's logits for ``measure="kl"``."""
    if measure not in MEASURES:
        raise LowbitError(f"unknown sensitivity measure {measure!r}; known: {', '.join(MEASURES)}")
    base = base or WeightOnly()
    cands = [c if isinstance(c, Candidate) else parse_candidates([c])[0] for c in candidates]
    check_candidates(base, cands)
    layers, left = _planned(model, Selector(include, exclude), cands)
    fisher = fisher_diagonals(model, calib, loss_fn, layers, progress) if measure == "fisher" else None
    errors = weight_errors(layers, cands, fisher, scale_dtype(base))
    del fisher
    if measure != "fisher":
        _measure_outputs(
            model, calib, layers, cands, errors, measure, scale_dtype(base), loss_fn, logits_fn, progress
        )
    names = list(layers)
    options = [[c for c in cands if c.name in errors[n]] for n in names]
    costs = [
        [c.nbytes(rows_cols(layers[n].weight), scale_dtype(base)) for c in opts]
        for n, opts in zip(names, options, strict=True)
    ]
    losses = [[errors[n][c.name][measure] for c in opts] for n, opts in zip(names, options, strict=True)]
    params = {n: layers[n].weight.numel() for n in names}
    shapes = {n: rows_cols(layers[n].weight) for n in names}
    return Table(names, options, costs, losses, params, errors, left, frontier(costs, losses), shapes)


def _measure_outputs(model, calib, layers, cands, errors, measure, sd, loss_fn, logits_fn, progress) -> None:
    """``errors[n][c][measure]``: the one-layer loss increase ("measured") or KL ("kl") of each layer ``n``
    at each candidate ``c`` it fits; negative (noise) counts as 0."""
    for c in cands:
        fit = {n: m for n, m in layers.items() if c.name in errors[n]}
        if measure == "kl":
            vals = one_layer_kl(model, calib, fit, c, sd, logits_fn, progress)
        else:
            vals = one_layer_losses(model, calib, loss_fn, fit, c, sd, progress)
        for n, d in vals.items():
            errors[n][c.name][measure] = max(d, 0.0)


def choose(table: Table, budget: Budget, base: Base | None = None) -> Plan:
    """The least-loss plan of ``table`` within ``budget`` (cheapest plan for a loss budget)."""
    base = base or WeightOnly()
    if budget.max_loss is not None:
        return table.plan(table.frontier.cheapest(budget.max_loss), base)
    if budget.max_latency_us is not None:
        return _within_latency(table, budget.max_latency_us, base)
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


def _within_latency(table: Table, max_us: float, base: Base) -> Plan:
    if isinstance(base, StaticW8A8):
        raise LowbitError(
            "latency budgets plan weight-only Linears; give a static plan a size or loss budget"
        )
    if table.latency_frontier is None:
        table.add_latencies(scale_dtype(base))
    f = table.latency_frontier
    try:
        return table.plan(f.at_most(math.floor(1000 * max_us)), base)
    except LowbitError:
        raise LowbitError(
            f"no plan runs within {max_us:.1f} us per call: the fastest reachable is "
            f"{f.min_cost / 1000:.1f} us (every planned layer at its fastest candidate); raise the budget or "
            "add a faster candidate"
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
    measure: str = "fisher",
    logits_fn: LogitsFn = lm_logits,
) -> Plan:
    """Measure, cost and allocate (module docstring): the plan for ``budget``. ``base``: the config the
    plan extends (method, scale dtype; its own bits/group apply to layers not planned)."""
    opts = {"base": base, "loss_fn": loss_fn, "include": include, "exclude": exclude, "progress": progress,
            "measure": measure, "logits_fn": logits_fn}  # fmt: skip
    with torch.enable_grad():
        table = sensitivity_table(model, calib, candidates, **opts)
    return choose(table, budget, base)
