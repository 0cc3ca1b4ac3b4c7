"""Block-by-block quantization of a Hugging Face decoder with calibration data (GPTQ, AWQ, SmoothQuant).

1. ``capture``: run the calibration batches through the embeddings with every decoder block swapped for
   a recorder, keeping block 0's input hidden states ``(b, L, hidden)`` per batch and the keyword
   arguments each block gets (attention mask, position embeddings / ids; they differ per block for
   models that mix sliding and full attention); the last recorder stops the forward.
2. ``quantize_block`` for each block in turn: hooks on its Linears gather input statistics during
   the block's float forward (Hessians for GPTQ, sampled input rows for AWQ, per-channel max |x| for
   SmoothQuant; Linears reading the same input share them); scales are searched and folded
   (``lowbit.transforms.mappings``); each Linear is rounded (GPTQ: once per group of Linears sharing
   an input, their rows stacked) and swapped for its quantized module; then the QUANTIZED block runs
   on the same inputs to give the next block's inputs, so later blocks see (and GPTQ compensates) the
   error of earlier ones.
3. Embeddings and the LM head are rounded like ``WeightOnly``/``Int8Dynamic`` do (tied weights shared).

Linears whose group saw no calibration token (e.g. MoE experts never routed to) are rounded without
data (HQQ) and listed in ``PipelineSummary.uncalibrated``. The same ``quantize_block`` serves the
in-memory path here and the streaming path (``lowbit.export.streaming``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import QuantizedTensor, rtn
from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.nn.dynamic import QDynamicLinear
from lowbit.nn.modules import FLOAT_TO_Q, QLinear
from lowbit.transforms.calibrate import input_spec
from lowbit.transforms.configs import Int8Dynamic, QuantConfig, SmoothQuant, WeightOnly
from lowbit.transforms.mappings import Architecture, architecture, blocks_path, fold_scales, resolve
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.weight_only import Plan, Rounding, rounding, swap_weights, weight_plan

SAMPLE_ROWS = 4096  # input rows kept (seeded random subset) per Linear input for AWQ's searches
CHUNK_TOKENS = 4096  # calibration samples of equal shape are stacked up to this many tokens per forward
GPTQ_BLOCK = 128  # columns per GPTQ lazy batch update


@dataclass
class PipelineSummary(QuantSummary):
    """``QuantSummary`` plus the block pipeline's own record.

    uncalibrated: Linears that saw no calibration token -> how they were rounded instead.
    scaled: producer fqn -> the consumers its equivalence scales were folded into (AWQ/SmoothQuant).
    """

    uncalibrated: dict[str, str] = field(default_factory=dict)
    scaled: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [super().__str__()]
        if self.scaled:
            lines.append(f"  scaled: {len(self.scaled)} producer -> consumer groups")
        lines += [f"  no calibration tokens: {k} ({v})" for k, v in self.uncalibrated.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class BlockPlan:
    """What ``quantize_block`` does to each Linear of a block.

    scales: "awq" | "smooth" | None (equivalence scales folded first). rounding: "rtn" | "hqq" |
    "gptq" | "awq" (AWQ's clipping search). qcls: the quantized module class."""

    spec: QuantSpec
    qcls: type[QLinear] = QLinear
    scales: str | None = None
    rounding: str = "rtn"
    alpha: float = 0.5
    damp: float = 0.01
    act_order: bool = True
    mse_clip: bool = True
    grid: int = 20

    @property
    def needs_data(self) -> bool:
        return self.scales is not None or self.rounding in ("gptq", "awq")


_METHODS = {"awq": ("awq", "awq"), "awq+gptq": ("awq", "gptq")}  # WeightOnly method -> (scales, rounding)


def block_plan(config: QuantConfig) -> BlockPlan:
    """The ``BlockPlan`` of a ``WeightOnly``, ``SmoothQuant`` or ``Int8Dynamic`` config."""
    if isinstance(config, SmoothQuant):
        return BlockPlan(config.linear_spec(), QDynamicLinear, scales="smooth", alpha=config.alpha)
    if isinstance(config, Int8Dynamic):
        return BlockPlan(config.linear_spec(), QDynamicLinear)
    if not isinstance(config, WeightOnly):
        name = type(config).__name__
        raise LowbitError(
            f"block-by-block quantization takes WeightOnly, SmoothQuant or Int8Dynamic, not {name}"
        )
    scales, rnd = _METHODS.get(config.method, (None, config.method))
    return BlockPlan(
        config.linear_spec(), scales=scales, rounding=rnd, damp=config.damp,
        act_order=config.act_order, mse_clip=config.mse_clip, grid=config.awq_grid,
    )  # fmt: skip


# ---- 1. capture ---------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


class _Recorder(nn.Module):
    """Stands in for a decoder block while capturing: records its inputs, returns the hidden states."""

    def __init__(self, block: nn.Module, keep_hidden: bool, last: bool) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_type", "is_sliding"):  # read by some models' block loops
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))
        self.keep_hidden, self.last = keep_hidden, last
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        self.kwargs.append({**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs)
        if self.keep_hidden:
            self.hidden.append(hidden.detach())
        if self.last:
            raise _Stop
        return hidden


@dataclass
class Captured:
    """Inputs of the blocks: ``hidden[j]`` (b, L, hidden) of the next block to run, batch ``j``;
    ``kwargs[i][j]``: keyword arguments of block ``i`` for batch ``j`` (shared tensors)."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch, use_cache=False)
    elif isinstance(batch, Mapping):
        model(**batch, use_cache=False)
    elif isinstance(batch, (tuple, list)):
        model(*batch, use_cache=False)
    else:
        kind = type(batch).__name__
        raise LowbitError(f"calibration batches must be tensors, mappings or tuples, got {kind}")


def regroup(batches: list, tokens: int = CHUNK_TOKENS) -> list[tuple[object, str]]:
    """``(batch, label)``: consecutive token tensors of equal shape ``(b, L)`` stacked into ``(k * b, L)``
    batches of at most ``tokens`` tokens (one forward each: 3x faster than ``(1, 512)`` at a time on
    CPU); other batches (mappings with attention masks, tuples) as they are. ``label`` names the
    original batch indices for errors ("3" or "0-7")."""
    out, run, first = [], [], 0
    for i, b in enumerate([*batches, None]):
        fits = isinstance(b, torch.Tensor) and b.dim() == 2 and (not run or b.shape[1:] == run[0].shape[1:])
        if run and (not fits or sum(r.numel() for r in run) + b.numel() > tokens):
            label = str(first) if len(run) == 1 else f"{first}-{first + len(run) - 1}"
            out.append((torch.cat(run) if len(run) > 1 else run[0], label))
            run = []
        if fits:
            first = i if not run else first
            run.append(b)
        elif b is not None:
            out.append((b, str(i)))
    return out


@torch.no_grad()
def capture(model: nn.Module, path: str, batches: list) -> Captured:
    """Block inputs for ``batches`` (see module docstring, stacked by ``regroup``); the blocks
    themselves never run, so they may sit on the meta device. ``path``: the block ``ModuleList``."""
    if not batches:
        raise LowbitError("the calibration set is empty: pass at least one batch")
    blocks = model.get_submodule(path)
    originals = list(blocks)
    recs = [_Recorder(b, i == 0, i == len(originals) - 1) for i, b in enumerate(originals)]
    try:
        for i, r in enumerate(recs):
            blocks[i] = r
        for j, (batch, label) in enumerate(regroup(batches)):
            try:
                _call(model, batch)
            except _Stop:
                pass
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                what = f"calibration batch {label} {input_spec(batch)}"
                raise LowbitError(f"{what} does not fit the model: {msg}") from e
            if any(len(r.kwargs) != j + 1 for r in recs):
                raise LowbitError(f"calibration batch {label} did not reach every block once")
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return Captured(recs[0].hidden, [r.kwargs for r in recs])


# ---- 2. one block -------------------------------------------------------------------------------


class _InputStats:
    """Statistics of one Linear input ``x (..., in)`` seen during a float forward."""

    def __init__(self, plan: BlockPlan, keep: float, seed: int) -> None:
        self.n = 0
        self.want_hessian = plan.rounding == "gptq"
        self.acc = None  # HessianAccumulator, on the device of the first input
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] | None = [] if "awq" in (plan.scales, plan.rounding) else None
        self.want_absmax = plan.scales == "smooth"
        self.keep, self.gen = keep, torch.Generator().manual_seed(seed)
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

    def finish(self) -> None:
        if self.acc is not None and self.n:
            self.hessian = self.acc.hessian()
        self.acc = None
        if self.rows is not None:
            self.x = torch.cat(self.rows) if self.rows else torch.zeros(0, 1)
            self.rows = None

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


@dataclass
class BlockResult:
    """What ``quantize_block`` did: fqn -> description, as in ``PipelineSummary``."""

    quantized: dict[str, str] = field(default_factory=dict)
    uncalibrated: dict[str, str] = field(default_factory=dict)
    scaled: dict[str, str] = field(default_factory=dict)


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
    """Raised by ``_gather``'s hook once the last statistic of a forward is in: the rest is not needed."""


@torch.no_grad()
def _gather(
    block: nn.Module, groups: dict[str, list[str]], plan: BlockPlan, hidden: list, kwargs: list[dict]
) -> dict[str, _InputStats]:
    """Statistics per input group (keyed by its first Linear) from the float forward of ``block``.

    Pre-hooks on the leads record their inputs. If the first batch calls every lead exactly once, later
    forwards stop at the last of them (its own product and what follows are never computed)."""
    tokens = sum(h.numel() // h.shape[-1] for h in hidden)
    keep = min(1.0, SAMPLE_ROWS / max(tokens, 1))
    stats = {lead: _InputStats(plan, keep, seed=i) for i, lead in enumerate(groups)}
    order: list[str] = []
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
            if j == 0 and sorted(order) == sorted(stats):
                last.append(order[-1])
    finally:
        for handle in handles:
            handle.remove()
    for st in stats.values():
        st.finish()
    return stats


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
            s = awq_scales(weights, st.x, plan.spec, grid=plan.grid, name=f"{prefix}.{pname}")
        else:
            s = smooth_scales(st.absmax, weights, plan.alpha)
        fold_scales(producer, [c for _, c in consumers], s, arch.norm_offset)
        st.rescale(s)
        result.scaled[f"{prefix}.{pname}"] = ", ".join(names)


def _round(w: torch.Tensor, st: _InputStats | None, plan: BlockPlan, name: str) -> QuantizedTensor:
    if plan.rounding == "gptq":
        from lowbit.algorithms.gptq import gptq

        opts = {"damp": plan.damp, "act_order": plan.act_order, "mse_clip": plan.mse_clip}
        opts["block_size"] = GPTQ_BLOCK
        return gptq(w, st.hessian, plan.spec, **opts, name=name)
    if plan.rounding == "awq":
        from lowbit.algorithms.awq import awq_clip

        return awq_clip(w, st.x, plan.spec, grid=plan.grid, name=name)
    return rounding(plan.rounding)(w, plan.spec, name)


def _gptq_stacked(
    targets: list, stats: dict[str, _InputStats], groups: dict[str, list[str]], plan: BlockPlan, prefix: str
) -> dict[str, QuantizedTensor]:
    """GPTQ once per input group of 2+ Linears (q/k/v, gate/up), their weights stacked along the
    output dim: rows are independent given the shared Hessian, so each Linear gets its own result,
    with one factorisation and one column sweep instead of one per Linear. name -> its rows."""
    mods, out = dict(targets), {}
    for lead, names in groups.items():
        st = stats.get(lead)
        if len(names) < 2 or st is None or not st.usable:
            continue
        w = torch.cat([mods[n].weight.detach() for n in names])
        qt = _round(w, st, plan, f"{prefix}.{{{','.join(names)}}}.weight")
        start = 0
        for n in names:
            rows = slice(start, start + mods[n].weight.shape[0])
            zp = None if qt.zero_point is None else qt.zero_point[rows].clone()
            out[n] = QuantizedTensor(qt.codes[rows].clone(), qt.scale[rows].clone(), zp, qt.spec)
            start = rows.stop
    return out


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


def quantize_block(
    block: nn.Module,
    prefix: str,
    plan: BlockPlan,
    arch: Architecture,
    select: Callable[[str], bool],
    hidden: list[torch.Tensor] | None = None,
    kwargs: list[dict] | None = None,
    propagate: bool = True,
) -> BlockResult:
    """Quantize the selected Linears of ``block`` (fqn prefix ``prefix``) in place, as ``plan`` says.

    ``hidden``/``kwargs``: the block's inputs per calibration batch (needed when ``plan.needs_data``).
    With ``propagate``, ``hidden`` is overwritten with the quantized block's outputs (next inputs).
    """
    result = BlockResult()
    targets = _linears(block, prefix, select)
    groups = _input_groups(block, arch, targets)
    lead_of = {n: lead for lead, members in groups.items() for n in members}
    stats: dict[str, _InputStats] = {}
    if plan.needs_data:
        stats = _gather(block, groups, plan, hidden, kwargs)
        if plan.scales:
            _fold_maps(block, prefix, arch, plan, stats, lead_of, result)
    stacked = _gptq_stacked(targets, stats, groups, plan, prefix) if plan.rounding == "gptq" else {}
    for name, m in targets:
        fqn, st = f"{prefix}.{name}", stats.get(lead_of[name])
        if name in stacked:
            qt = stacked[name]
        elif plan.needs_data and not st.usable:
            qt = rounding("hqq")(m.weight.detach(), plan.spec, f"{fqn}.weight")
            result.uncalibrated[fqn] = "hqq"
        else:
            qt = _round(m.weight.detach(), st, plan, f"{fqn}.weight")
        q = plan.qcls.from_float(m, plan.spec)
        q.set_weight(qt)
        if m.bias is not None:
            q.bias = m.bias.detach().clone()
        block.set_submodule(name, q)
        result.quantized[fqn] = q.extra_repr()
    if plan.needs_data and propagate:
        _run(block, hidden, kwargs, out=hidden)
    return result


# ---- 3. the model ------------------------------------------------------------------------------


def rest_plan(config: QuantConfig) -> tuple[Plan, Rounding]:
    """``(plan, rounding)`` for the Linear/Embedding layers outside the blocks (embeddings, LM head):
    as ``WeightOnly`` (RTN; HQQ for method "hqq") or ``Int8Dynamic`` (also for ``SmoothQuant``) do."""
    if isinstance(config, (SmoothQuant, Int8Dynamic)):

        def plan(m: nn.Module):
            if isinstance(m, nn.Embedding):
                spec = config.embedding_spec()
                return (FLOAT_TO_Q[nn.Embedding], spec) if spec is not None else None
            return QDynamicLinear, config.linear_spec()

        return plan, rtn
    return weight_plan(config), rounding(config.method)


def quantize_rest(
    model: nn.Module, config: QuantConfig, select: Callable[[str], bool], summary: QuantSummary
) -> None:
    """Round the selected Linear/Embedding layers outside the blocks as ``rest_plan`` says."""
    plan, quantize = rest_plan(config)
    swap_weights(model, plan, select, summary, False, quantize)


def check_calib(config: QuantConfig, calib: Iterable | None) -> list:
    """``calib`` as a list; ``LowbitError`` if the config needs data and there is none."""
    if calib is None:
        if block_plan(config).needs_data:
            what = f"method {config.method!r}" if isinstance(config, WeightOnly) else type(config).__name__
            raise LowbitError(
                f"{what} needs calibration data: pass calib=batches, e.g. "
                "lowbit.data.calib_batches(tokenizer, 128, 512) (CLI: --calib wiki:128x512)"
            )
        return []
    return list(calib)


def quantize_sequential(
    model: nn.Module, config: QuantConfig, calib: Iterable | None, select: Selector, progress: bool
) -> PipelineSummary:
    """Quantize a Hugging Face decoder in place, block by block (module docstring)."""
    plan = block_plan(config)
    batches = check_calib(config, calib)
    arch = architecture(getattr(model, "config", None))
    path = blocks_path(model, arch)
    blocks = model.get_submodule(path)
    summary = PipelineSummary(config)
    was_training = model.training
    model.eval()
    try:
        cap = capture(model, path, batches) if plan.needs_data else None
        label = config.method if isinstance(config, WeightOnly) else "smoothquant"
        for i in tqdm(range(len(blocks)), desc=label, unit="block", disable=not progress):
            res = quantize_block(
                blocks[i], f"{path}.{i}", plan, arch, select,
                cap.hidden if cap else None, cap.kwargs[i] if cap else None, propagate=i + 1 < len(blocks),
            )  # fmt: skip
            merge(summary, res)
        quantize_rest(model, config, lambda fqn: select(fqn) and not fqn.startswith(path + "."), summary)
    finally:
        model.train(was_training)
    return summary


def merge(summary: PipelineSummary, res: BlockResult) -> None:
    summary.quantized.update(res.quantized)
    summary.uncalibrated.update(res.uncalibrated)
    summary.scaled.update(res.scaled)


@register_handler(SmoothQuant)
def smoothquant(model: nn.Module, config: SmoothQuant, calib, select: Selector, progress: bool):
    """SmoothQuant scales folded block by block, then W8A8 dynamic layers (``QDynamicLinear``)."""
    return quantize_sequential(model, config, calib, select, progress)
