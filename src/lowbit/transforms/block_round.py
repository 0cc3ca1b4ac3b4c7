"""Rounding the Linears of one decoder block (``lowbit.transforms.block``): the plan (``BlockPlan``,
with a spec per Linear), the statistics of a Linear input that rounding reads (``InputStats``), and
the rounding of one input group, the Linears that read the same input (``round_group``).

Linears of one group may have different specs (a mixed-precision plan, ``WeightOnly.layers``): GPTQ
stacks those that share a spec and rounds the others one by one from the shared Hessian
(``round_group``), and AWQ's scale search scores each weight with its own spec
(``lowbit.algorithms.awq.awq_scales``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.spec import QuantSpec
from lowbit.nn.modules import QLinear
from lowbit.transforms.block_train import Training
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.swap import rounding

GPTQ_BLOCK = 128  # columns per GPTQ lazy batch update


@dataclass(frozen=True)
class BlockPlan:
    """What ``quantize_block`` does to each Linear of a block.

    spec: the Linears' spec; layer_specs: full fqn -> spec of a Linear with its own (``spec_of``).
    scales: "awq" | "smooth" | None (equivalence scales folded first). rounding: "rtn" | "hqq" |
    "gptq" | "awq" (AWQ's clipping search). qcls: the quantized module class. true_sequential: GPTQ
    statistics of each input group from the block quantized up to it (``lowbit.transforms.block``).
    compute: matmul dtype of the block's calibration forwards, "auto" | "float32" | "bfloat16"
    (``block.compute_dtype``). train: after rounding, train the rounded Linears against the float
    block's outputs (``lowbit.transforms.block_train``; method "qat")."""

    spec: QuantSpec
    qcls: type[QLinear] = QLinear
    scales: str | None = None
    rounding: str = "rtn"
    alpha: float = 0.5
    damp: float = 0.01
    act_order: bool = True
    mse_clip: bool = True
    grid: int = 20
    true_sequential: bool = False
    compute: str = "float32"
    train: Training | None = None
    layer_specs: Mapping[str, QuantSpec] = field(default_factory=dict, hash=False)

    def spec_of(self, fqn: str) -> QuantSpec:
        """Spec of the Linear ``fqn`` (full name, e.g. "model.layers.0.self_attn.q_proj")."""
        return self.layer_specs.get(fqn, self.spec)

    @property
    def needs_data(self) -> bool:
        return self.scales is not None or self.rounding in ("gptq", "awq") or self.train is not None

    @property
    def label(self) -> str:
        """Name of the method for progress bars: "gptq", "awq", "awq+gptq", "smoothquant", "rtn", ..."""
        if self.scales == "smooth":
            return "smoothquant"
        if self.train is not None:
            return "qat"
        return f"{self.scales}+{self.rounding}" if self.scales not in (None, self.rounding) else self.rounding


class InputStats:
    """Statistics of one Linear input ``x (..., in)`` seen during a float forward.

    AWQ's row sample: each row is kept with probability ``keep`` by a draw from a generator seeded per
    group, rows taken in calibration order; ``skip``: rows of the calibration forwards run by earlier
    ranks, whose draws come first (so ranks together keep the rows one process would)."""

    def __init__(self, plan: BlockPlan, keep: float, seed: int, skip: int = 0) -> None:
        self.n = 0
        self.want_hessian = plan.rounding == "gptq"
        self.acc = None  # HessianAccumulator, on the device of the first input
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] | None = [] if "awq" in (plan.scales, plan.rounding) else None
        self.want_absmax = plan.scales == "smooth"
        self.keep, self.gen = keep, torch.Generator().manual_seed(seed)
        if self.rows is not None and skip:
            torch.rand(skip, generator=self.gen)
        self.hessian: torch.Tensor | None = None
        self.x: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        self.n += rows.shape[0]
        if self.want_hessian:
            if self.acc is None:
                from lowbit.algorithms.gptq import HessianAccumulator

                self.acc = HessianAccumulator(rows.shape[1], device=rows.device)
            self.acc.update(rows)
        if self.want_absmax:
            amax = rows.abs().amax(0)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.rows is not None:
            pick = torch.rand(rows.shape[0], generator=self.gen) < self.keep
            self.rows.append(rows[pick.to(rows.device)].clone())

    def finish(self, width: int, comm: Comm = SOLO, owner: int = 0, n: int | None = None) -> None:
        """Combine the ranks' statistics (``n``: the rows all ranks saw): the Hessian on rank ``owner``
        only (summed in rank order), maxima and sampled rows (in rank order) on every rank."""
        if self.rows is not None:
            self.x = comm.cat_all(torch.cat(self.rows) if self.rows else torch.zeros(0, width))
            self.rows = None
        if comm.world > 1:
            self._combine(width, comm, owner, n)
        elif self.acc is not None and self.n:
            self.hessian = self.acc.hessian()
        self.acc = None

    def _combine(self, width: int, comm: Comm, owner: int, n: int) -> None:
        if self.want_hessian:
            from lowbit.algorithms.gptq import HessianAccumulator, block_rows

            part = self.acc.total if self.acc is not None else torch.zeros(width, width)
            total = torch.zeros_like(part) if comm.rank == owner else None
            for a, b in block_rows(width):  # the upper block rows, the part that holds sums
                rows = comm.sum_to(part[a:b, a:].contiguous(), owner)
                if total is not None:
                    total[a:b, a:] = rows
            if total is not None and n:
                self.hessian = HessianAccumulator.from_total(total, n).hessian()
        if self.want_absmax:
            self.absmax = comm.max_all(self.absmax if self.absmax is not None else torch.zeros(width))
        self.n = n

    def rescale(self, s: torch.Tensor) -> None:
        """The input became ``x / s`` (scales folded into its producer)."""
        if self.hessian is not None:
            self.hessian = self.hessian / (s[:, None] * s[None, :])
        if self.absmax is not None:
            self.absmax = self.absmax / s
        if self.x is not None and self.x.numel():
            self.x = self.x / s

    @property
    def usable(self) -> bool:
        return self.n > 0 and (self.x is None or self.x.shape[0] > 0)


def round_weight(
    w: torch.Tensor, st: InputStats | None, plan: BlockPlan, spec: QuantSpec, name: str
) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """``w`` rounded to ``spec`` as ``plan.rounding`` says, and for GPTQ before block training
    (``plan.train``) the values it rounded (where the training starts; ``gptq(return_values=True)``),
    else None."""
    if plan.rounding == "gptq":
        from lowbit.algorithms.gptq import gptq

        opts = {"damp": plan.damp, "act_order": plan.act_order, "mse_clip": plan.mse_clip}
        opts["block_size"] = GPTQ_BLOCK
        if plan.train is not None:
            return gptq(w, st.hessian, spec, **opts, name=name, return_values=True)
        return gptq(w, st.hessian, spec, **opts, name=name), None
    if plan.rounding == "awq":
        from lowbit.algorithms.awq import awq_clip

        return awq_clip(w, st.x, spec, grid=plan.grid, name=name), None
    return rounding(plan.rounding)(w, spec, name), None


def round_group(
    names: list[str],
    mods: dict[str, nn.Linear],
    st: InputStats | None,
    plan: BlockPlan,
    prefix: str,
    starts: dict[str, torch.Tensor],
) -> dict[str, QuantizedTensor]:
    """Round the Linears ``names`` (of the block at ``prefix``) that share input statistics ``st``, each
    to its own spec (``plan.spec_of``): name -> its quantized weight; the values GPTQ rounded, where
    block training starts, go to ``starts`` (``round_weight``).

    GPTQ on 2+ Linears of one spec (q/k/v, gate/up) runs once on their weights stacked along the output
    dim: rows are independent given the shared Hessian, so each Linear gets its own result, with one
    factorisation and one column sweep instead of one per Linear. Linears whose spec no other member
    shares are rounded on their own from the same Hessian (k/v stacked, q alone, when q differs). A
    group that saw no calibration token is rounded without data (HQQ; ``PipelineSummary.uncalibrated``)."""
    specs = {n: plan.spec_of(f"{prefix}.{n}") for n in names}
    weights = {n: mods[n].weight.detach() for n in names}
    if plan.needs_data and not st.usable:
        return {n: rounding("hqq")(weights[n], specs[n], f"{prefix}.{n}.weight") for n in names}
    out = {}
    if plan.rounding == "gptq":  # Linears of one spec are stacked: one factorisation, one sweep
        by_spec: dict[QuantSpec, list[str]] = {}
        for n in names:
            by_spec.setdefault(specs[n], []).append(n)
        for members in by_spec.values():
            if len(members) > 1:
                out |= _round_stacked(members, weights, st, plan, prefix, specs[members[0]], starts)
    for n in names:
        if n not in out:
            out[n], values = round_weight(weights[n], st, plan, specs[n], f"{prefix}.{n}.weight")
            if values is not None:
                starts[n] = values
    return {n: out[n] for n in names}


def _round_stacked(
    names: list[str],
    weights: dict,
    st: InputStats,
    plan: BlockPlan,
    prefix: str,
    spec: QuantSpec,
    starts: dict,
) -> dict[str, QuantizedTensor]:
    """GPTQ on the weights ``names`` (one spec) stacked along the output dim, split back per Linear."""
    name = f"{prefix}.{{{','.join(names)}}}.weight"
    qt, values = round_weight(torch.cat([weights[n] for n in names]), st, plan, spec, name)
    out, start = {}, 0
    for n in names:
        rows = slice(start, start + weights[n].shape[0])
        zp = None if qt.zero_point is None else qt.zero_point[rows].clone()
        levels = None if qt.levels is None else qt.levels[rows].clone()
        out[n] = QuantizedTensor(qt.codes[rows].clone(), qt.scale[rows].clone(), zp, qt.spec, levels)
        if values is not None:
            starts[n] = values[rows].clone()
        start = rows.stop
    return out


def share_group(
    qts: dict[str, QuantizedTensor] | None, specs: dict[str, QuantSpec], src: int, comm: Comm
) -> dict[str, QuantizedTensor]:
    """The quantized weights ``qts`` of one group (names and specs: ``specs``), rounded on rank
    ``src``, on every rank."""
    if comm.world == 1:
        return qts
    names = list(specs)
    flat = (
        [t for n in names for t in (qts[n].codes, qts[n].scale, qts[n].zero_point, qts[n].levels)]
        if qts
        else [None] * (4 * len(names))
    )
    flat = comm.broadcast(flat, src)
    out = {}
    for k, n in enumerate(names):
        codes, scale, zp, levels = flat[4 * k : 4 * k + 4]
        out[n] = QuantizedTensor(codes, scale, zp, specs[n], levels)
    return out
