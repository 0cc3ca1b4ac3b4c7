"""One decoder block of the block-by-block pipeline (``lowbit.transforms.sequential``): gather the input
statistics of its Linears from a forward (Hessians for GPTQ, sampled input rows for AWQ, per-channel
max |x| for SmoothQuant; Linears reading the same input share them), fold equivalence scales, round
each input group and swap in quantized modules, then run the quantized block to give the next inputs.
The rounding itself (the ``BlockPlan``, each Linear's spec, GPTQ on stacked groups) is
``lowbit.transforms.block_round``.

GPTQ may run "true sequential" (``BlockPlan.true_sequential``, as in the GPTQ reference code;
llm-compressor takes every Hessian of a block from its float forward): q/k/v are rounded from the
block's float forward, o_proj from a forward through the quantized q/k/v, gate/up after the quantized
attention, down_proj after the quantized gate/up, so each Linear also compensates the error of those
before it in the block. Off by default: it is slower and does not lower perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.nn.modules import QLinear
from lowbit.transforms.basis import record
from lowbit.transforms.block_round import BlockPlan, InputStats, round_group, share_group
from lowbit.transforms.block_train import train_block
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.mappings import Architecture, fold_scales, resolve

__all__ = ["BlockPlan", "BlockResult", "compute_dtype", "gather", "quantize_block"]

SAMPLE_ROWS = 4096  # input rows kept (seeded random subset) per Linear input for AWQ's searches


def compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The matmul dtype ``name`` ("auto" | "float32" | "bfloat16") means on ``device``: "auto" is
    bfloat16 where matmuls have native bf16 (CPU with AMX or AVX512-BF16; CUDA if supported), else
    float32. Calibration forwards of other dtypes run under ``torch.autocast``."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
            native = device.type == "cpu" and any(getattr(torch.cpu, p, lambda: False)() for p in probes)
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@contextmanager
def _compute(block: nn.Module, name: str) -> Iterator[None]:
    """Context for the block's calibration forwards and statistics in ``compute_dtype(name)``, unless
    that is the block's own dtype: autocast, and for bfloat16 on CPU, float32 matmuls (the Hessians'
    ``x^T x``) from bf16-rounded inputs with float32 accumulation and output (oneDNN's
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, process-wide, restored on exit): the
    Linears under autocast see those bf16 inputs too. The Hessians come out faster, and closer to a
    float64 reference than IEEE float32 sums."""
    p = next(block.parameters(), None)
    dtype = None if p is None else compute_dtype(name, p.device)
    if dtype is None or dtype == p.dtype:
        yield
        return
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    try:
        if p.device.type == "cpu" and dtype == torch.bfloat16:
            mm.fp32_precision = "bf16"
        with torch.autocast(p.device.type, dtype=dtype):
            yield
    finally:
        mm.fp32_precision = old


@dataclass
class BlockResult:
    """What ``quantize_block`` did: fqn -> description, as in ``PipelineSummary``."""

    quantized: dict[str, str] = field(default_factory=dict)
    uncalibrated: dict[str, str] = field(default_factory=dict)
    scaled: dict[str, str] = field(default_factory=dict)
    trained: dict[str, str] = field(default_factory=dict)
    basis: dict[str, dict] = field(default_factory=dict)  # lowbit.transforms.basis: folded scales


def _linears(block: nn.Module, prefix: str, select: Callable[[str], bool]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear and select(f"{prefix}.{n}")]


@torch.no_grad()
def _run(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], out: list | None = None) -> None:
    """Run ``block`` on every batch; with ``out`` (may be ``hidden``) store the outputs there."""
    for j, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
        y = block(h, **kw)
        if out is not None:
            out[j] = y[0] if isinstance(y, tuple) else y


class _Seen(Exception):
    """Raised by ``gather``'s hook once the last statistic of a forward is in: the rest is not needed."""


@torch.no_grad()
def gather(
    block: nn.Module,
    groups: dict[str, list[str]],
    plan: BlockPlan,
    hidden: list,
    kwargs: list[dict],
    comm: Comm = SOLO,
    owner: dict[str, int] | None = None,
) -> dict[str, InputStats]:
    """Statistics per input group (keyed by its first Linear) from a forward of ``block``, in the order
    the first batch reached the groups (groups it never reached last; rank 0's first batch).

    Pre-hooks on the leads record their inputs. If the first batch calls every lead exactly once, later
    forwards stop at the last of them (its own product and what follows are never computed).
    With several ranks (``comm``), ``hidden`` is this rank's share of the calibration forwards and the
    statistics are combined (``InputStats.finish``; a Hessian on ``owner[lead]`` only)."""
    rows = comm.counts(sum(h.numel() // h.shape[-1] for h in hidden))
    keep = min(1.0, SAMPLE_ROWS / max(sum(rows), 1))
    skip = sum(rows[: comm.rank])
    stats = {lead: InputStats(plan, keep, seed=i, skip=skip) for i, lead in enumerate(groups)}
    order: list[str] = []
    first: list[str] = []  # the first batch's order
    last: list[str] = []  # the lead to stop at, once known

    def hook(lead: str):
        def record(module, args):
            if args:
                stats[lead].update(args[0].detach())
            order.append(lead)
            if last and lead == last[0]:
                raise _Seen

        return record

    handles = [block.get_submodule(lead).register_forward_pre_hook(hook(lead)) for lead in stats]
    try:
        for j, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            order.clear()
            try:
                block(h, **kw)
            except _Seen:
                pass
            if j == 0:
                first += order
                if sorted(order) == sorted(stats):
                    last.append(order[-1])
    finally:
        for handle in handles:
            handle.remove()
    seen = comm.sum_ints([st.n for st in stats.values()])
    for (lead, st), n in zip(stats.items(), seen, strict=True):
        st.finish(block.get_submodule(lead).in_features, comm, (owner or {}).get(lead, 0), n)
    first = comm.first(first)
    return {lead: stats[lead] for lead in [*dict.fromkeys(first), *stats]}


def _fold_maps(block, prefix, arch, plan, stats, lead_of, result) -> None:
    """Search and fold equivalence scales for each scale map whose consumers are all selected."""
    from lowbit.algorithms.awq import awq_scales
    from lowbit.algorithms.smoothquant import smooth_scales

    for pname, producer, consumers in resolve(block, arch):
        names = [n for n, _ in consumers]
        if any(n not in lead_of for n in names) or len({lead_of[n] for n in names}) != 1:
            continue
        st = stats[lead_of[names[0]]]
        if not st.usable:
            continue
        weights = [c.weight for _, c in consumers]
        if plan.scales == "awq":
            specs = [plan.spec_of(f"{prefix}.{n}") for n in names]  # each scored with its own spec
            s = awq_scales(weights, st.x, specs, grid=plan.grid, name=f"{prefix}.{pname}")
        else:
            s = smooth_scales(st.absmax, weights, plan.alpha)
        fold_scales(producer, [c for _, c in consumers], s, arch.norm_offset)
        st.rescale(s)
        result.scaled[f"{prefix}.{pname}"] = ", ".join(names)
        for n in names:
            record(result.basis, f"{prefix}.{n}", inputs=s)
        if isinstance(producer, nn.Linear):
            record(result.basis, f"{prefix}.{pname}", rows=1.0 / s)


def _input_groups(block: nn.Module, arch: Architecture, targets: list) -> dict[str, list[str]]:
    """Selected Linears grouped by shared input (consumers of one scale map): lead name -> names."""
    shared = {}
    for _, _, consumers in resolve(block, arch):
        for n, _ in consumers:
            shared[n] = consumers[0][0]
    names = {n for n, _ in targets}
    groups: dict[str, list[str]] = {}
    for n, _ in targets:
        lead = shared.get(n, n)
        groups.setdefault(lead if lead in names else n, []).append(n)
    return groups


def _stand_in(block: nn.Module, name: str, m: nn.Linear, q: QLinear) -> None:
    """Until the block is done, what runs for Linear ``name``: for weight-only ``QLinear`` the float
    module given ``q``'s dequantized weight (the same products as ``q``, at float matmul speed on
    32k-token calibration batches, where the int4 CPU kernels are slower); modules that quantize
    activations too (W8A8) themselves."""
    if type(q) is QLinear:
        m.weight = nn.Parameter(q.dequantized_weight(m.weight.dtype), requires_grad=False)
    else:
        block.set_submodule(name, q)


def _cost(names: list[str], mods: dict[str, nn.Linear], plan: BlockPlan, prefix: str) -> float:
    """Relative cost of rounding an input group: GPTQ's sweep and factorisation ``in^2 (out + in/3)``
    (down_proj's wide input dominates; one factorisation per Linear when their specs differ), else
    the weight size."""
    out, width = sum(mods[n].out_features for n in names), mods[names[0]].in_features
    mixed = len({plan.spec_of(f"{prefix}.{n}") for n in names}) > 1
    runs = len(names) if mixed else 1
    return width * width * (out + runs * width / 3) if plan.rounding == "gptq" else out * width


@dataclass
class _Block:
    """One block being quantized: its Linears by name, input groups, their owners and the result."""

    module: nn.Module
    prefix: str
    plan: BlockPlan
    mods: dict[str, nn.Linear]
    groups: dict[str, list[str]]
    owner: dict[str, int]
    comm: Comm
    swaps: dict[str, QLinear] = field(default_factory=dict)
    starts: dict[str, torch.Tensor] = field(default_factory=dict)  # where block training starts

    def round_own(self, lead: str, st: InputStats | None) -> dict[str, QuantizedTensor] | None:
        """Group ``lead`` rounded if this rank owns it, else None."""
        if self.owner[lead] != self.comm.rank:
            return None
        return round_group(self.groups[lead], self.mods, st, self.plan, self.prefix, self.starts)

    def swap(self, lead: str, qts: dict[str, QuantizedTensor] | None) -> None:
        """Build group ``lead``'s quantized modules (each with its spec) from its owner's ``qts``;
        stand them in."""
        specs = {n: self.plan.spec_of(f"{self.prefix}.{n}") for n in self.groups[lead]}
        for name, qt in share_group(qts, specs, self.owner[lead], self.comm).items():
            m = self.swaps[name] = self.plan.qcls.from_float(self.mods[name], specs[name])
            m.set_weight(qt)
            if self.mods[name].bias is not None:
                m.bias = self.mods[name].bias.detach().clone()
            _stand_in(self.module, name, self.mods[name], m)


def quantize_block(
    block: nn.Module,
    prefix: str,
    plan: BlockPlan,
    arch: Architecture,
    select: Callable[[str], bool],
    hidden: list[torch.Tensor] | None = None,
    kwargs: list[dict] | None = None,
    propagate: bool = True,
    comm: Comm = SOLO,
    reference: list[torch.Tensor] | None = None,
) -> BlockResult:
    """Quantize the selected Linears of ``block`` (fqn prefix ``prefix``) in place, as ``plan`` says.

    ``hidden``/``kwargs``: the block's inputs per calibration batch (needed when ``plan.needs_data``).
    Input groups are rounded in forward order; with ``plan.true_sequential`` each group after the first
    gets its statistics again from a forward through the block as quantized so far (``_stand_in``).
    The quantized modules replace the Linears once the block is done.
    With ``propagate``, ``hidden`` is overwritten with the quantized block's outputs (next inputs).
    ``comm``: the ranks of a distributed run (``lowbit.transforms.comm``): ``hidden`` is this rank's
    share, statistics are combined, and each input group is rounded on one rank (``Comm.owners``, by
    ``_cost``) and broadcast; every rank ends with the same block. With ``plan.train``, the rounded
    Linears are trained against the float block's outputs on ``hidden`` before the next inputs are
    made (``block_train.train_block``; one process only); given ``reference``, the float model's own
    inputs of this block, against the float block's outputs on those instead, which then overwrite
    ``reference`` (``Training.target`` "model").
    """
    result = BlockResult()
    wanted = None
    if plan.train is not None:
        wanted = _targets(block, prefix, plan, hidden if reference is None else reference, kwargs, comm)
        if reference is not None:
            reference[:] = wanted
    targets = _linears(block, prefix, select)
    mods, groups = dict(targets), _input_groups(block, arch, targets)
    owners = comm.owners([_cost(names, mods, plan, prefix) for names in groups.values()])
    b = _Block(block, prefix, plan, mods, groups, dict(zip(groups, owners, strict=True)), comm)
    stats: dict[str, InputStats] = {}
    if plan.needs_data:
        with _compute(block, plan.compute):
            stats = gather(block, groups, plan, hidden, kwargs, comm, b.owner)
        if plan.scales:
            lead_of = {n: lead for lead, names in groups.items() for n in names}
            _fold_maps(block, prefix, arch, plan, stats, lead_of, result)
        for lead, st in stats.items():
            if not st.usable:
                result.uncalibrated |= {f"{prefix}.{n}": "hqq" for n in groups[lead]}
    order = list(stats or groups)  # ``gather`` orders its stats by first call
    if plan.needs_data and plan.true_sequential:
        for k, lead in enumerate(order):
            if k:
                with _compute(block, plan.compute):
                    stats[lead] = gather(block, {lead: groups[lead]}, plan, hidden, kwargs, comm, b.owner)[
                        lead
                    ]
            b.swap(lead, b.round_own(lead, stats.pop(lead)))
    else:  # every rank rounds its own groups (each Hessian freed once used), then they are exchanged
        own = {lead: b.round_own(lead, stats.pop(lead, None)) for lead in order}
        for lead in order:
            b.swap(lead, own.pop(lead))
    if wanted is not None:
        result.trained[prefix] = _train(b, hidden, kwargs, wanted)
        del wanted
    if plan.needs_data and propagate:
        with _compute(block, plan.compute):
            _run(block, hidden, kwargs, out=hidden)
    for name, q in b.swaps.items():
        block.set_submodule(name, q)
        result.quantized[f"{prefix}.{name}"] = q.extra_repr()
    return result


def _targets(block: nn.Module, prefix: str, plan: BlockPlan, hidden, kwargs, comm: Comm) -> list:
    """The float block's outputs on ``hidden``: what ``plan.train`` trains the rounded block toward."""
    if comm.world > 1:
        raise LowbitError(f"{prefix}: method 'qat' (block training) does not run distributed")
    targets: list = [None] * len(hidden)
    with _compute(block, plan.compute):
        _run(block, hidden, kwargs, out=targets)
    return targets


def _train(b: _Block, hidden: list, kwargs: list[dict], targets: list) -> str:
    """Train the rounded Linears of ``b`` toward ``targets`` (``block_train``), stand the result in."""
    compute = lambda: _compute(b.module, b.plan.compute)  # noqa: E731
    done = train_block(b.module, b.swaps, hidden, kwargs, targets, b.plan.train, b.prefix, compute, b.starts)
    b.starts.clear()
    for name, q in b.swaps.items():
        _stand_in(b.module, name, b.mods[name], q)
    return done
