"""Block-by-block quantization of a Hugging Face decoder with calibration data (GPTQ, AWQ, SmoothQuant).

1. ``capture``: run the calibration batches through the embeddings with every decoder block swapped for
   a recorder, keeping block 0's input hidden states ``(b, L, hidden)`` per batch and the keyword
   arguments each block gets (attention mask, position embeddings / ids; they differ per block for
   models that mix sliding and full attention); the last recorder stops the forward.
2. ``quantize_block`` (``lowbit.transforms.block``) for each block in turn: hooks on its Linears
   gather input statistics during the block's forward (Hessians for GPTQ, sampled input rows for AWQ,
   per-channel max |x| for SmoothQuant; Linears reading the same input share them); scales are
   searched and folded (``lowbit.transforms.mappings``); each input group is rounded (GPTQ: once per
   group, rows stacked; with ``true_sequential``, from the block quantized so far) and swapped for
   quantized modules; then the QUANTIZED block runs on the same inputs to give the next block's
   inputs, so later blocks see (and GPTQ compensates) the error of earlier ones.
3. ``quantize_rest``: embeddings and the LM head are rounded like ``WeightOnly``/``Int8Dynamic`` do
   (tied weights shared); tables a store left on the meta device are read and rounded a row chunk at
   a time (``swap.quantize_tables``).

Linears whose group saw no calibration token (e.g. MoE experts never routed to) are rounded without
data (HQQ) and listed in ``PipelineSummary.uncalibrated``. Steps 1-2 are ``run_blocks``, the one block
loop, step 3 ``quantize_rest``; ``run_pipeline`` runs all three, given a block store
(``lowbit.transforms.store``) that says where tensors come from and go to: in memory
(``quantize_sequential``) or read from safetensors and staged on disk
(``lowbit.export.streaming.quantize_folder``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import rtn
from lowbit.core.errors import LowbitError
from lowbit.nn.dynamic import QDynamicLinear
from lowbit.nn.modules import FLOAT_TO_Q
from lowbit.transforms.basis import merge_into, record
from lowbit.transforms.block import BlockResult, compute_dtype, quantize_block
from lowbit.transforms.block_round import BlockPlan
from lowbit.transforms.block_train import Training
from lowbit.transforms.calibrate import input_spec
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.configs import Int8Dynamic, QuantConfig, SmoothQuant, WeightOnly
from lowbit.transforms.mappings import architecture, blocks_path
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler
from lowbit.transforms.store import BlockStore, InMemoryStore
from lowbit.transforms.swap import Plan, Rounding, quantize_tables, rounding, swap_weights, weight_plan

CHUNK_TOKENS = 2048  # calibration samples of equal shape are stacked up to this many tokens per forward


@dataclass
class PipelineSummary(QuantSummary):
    """``QuantSummary`` plus the block pipeline's own record.

    uncalibrated: Linears that saw no calibration token -> how they were rounded instead.
    scaled: producer fqn -> the consumers its equivalence scales were folded into (AWQ/SmoothQuant).
    trained: block fqn -> its block output error before and after training (method "qat").
    compute_dtype: matmul dtype of the calibration forwards (None: no calibration forward ran).
    """

    uncalibrated: dict[str, str] = field(default_factory=dict)
    scaled: dict[str, str] = field(default_factory=dict)
    trained: dict[str, str] = field(default_factory=dict)
    compute_dtype: str | None = None
    basis: dict[str, dict] = field(default_factory=dict)  # lowbit.transforms.basis: folded scales

    def __str__(self) -> str:
        lines = [super().__str__()]
        if self.scaled:
            lines.append(f"  scaled: {len(self.scaled)} producer -> consumer groups")
        lines += [f"  no calibration tokens: {k} ({v})" for k, v in self.uncalibrated.items()]
        lines += [f"  trained {k}: {v}" for k, v in self.trained.items()]
        if self.compute_dtype:
            lines.append(f"  calibration forwards in {self.compute_dtype}")
        return "\n".join(lines)


# WeightOnly method -> (scales, rounding); "qat" trains after that rounding
_METHODS = {"awq": ("awq", "awq"), "awq+gptq": ("awq", "gptq"), "qat": ("awq", "gptq")}


def block_plan(config: QuantConfig) -> BlockPlan:
    """The ``BlockPlan`` of a ``WeightOnly``, ``SmoothQuant`` or ``Int8Dynamic`` config; a
    ``WeightOnly``'s per-layer formats become ``BlockPlan.layer_specs`` (entries naming layers outside
    the blocks, such as embeddings, are never read there)."""
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
    train = None
    if config.method == "qat":
        train = Training(config.train_epochs, config.train_lr, config.train_qparam_lr, config.train_batch,
                         config.train_target)  # fmt: skip
    return BlockPlan(
        config.linear_spec(), scales=scales, rounding=rnd, damp=config.damp,
        act_order=config.act_order, mse_clip=config.mse_clip, grid=config.awq_grid,
        true_sequential=config.true_sequential, compute=config.compute_dtype, train=train,
        layer_specs={fqn: config.linear_spec(fqn) for fqn in config.layers},
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
    batches of at most ``tokens`` tokens (one forward each: faster than ``(1, 512)`` at a time on
    CPU; 2048 tokens run as fast as 4096 and halve the MLP's activations, 4 x 2048 x 4864 floats for
    Qwen2.5-0.5B); other batches (mappings with attention masks, tuples) as they are. ``label`` names the
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
def capture(model: nn.Module, path: str, batches: list, comm: Comm = SOLO) -> Captured:
    """Block inputs for ``batches`` (see module docstring, stacked by ``regroup``); the blocks
    themselves never run, so they may sit on the meta device. ``path``: the block ``ModuleList``.
    With several ranks (``comm``), only this rank's share of the stacked forwards (``Comm.share``)."""
    if not batches:
        raise LowbitError("the calibration set is empty: pass at least one batch")
    chunks = regroup(batches)
    chunks = [chunks[j] for j in comm.share(len(chunks))]
    blocks = model.get_submodule(path)
    originals = list(blocks)
    recs = [_Recorder(b, i == 0, i == len(originals) - 1) for i, b in enumerate(originals)]
    try:
        for i, r in enumerate(recs):
            blocks[i] = r
        for j, (batch, label) in enumerate(chunks):
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


# ---- 3. the model ------------------------------------------------------------------------------


def rest_plan(config: QuantConfig) -> tuple[Plan, Rounding]:
    """``(plan, rounding)`` for the Linear/Embedding layers outside the blocks (embeddings, LM head):
    as ``WeightOnly`` (RTN; HQQ for method "hqq") or ``Int8Dynamic`` (also for ``SmoothQuant``) do."""
    if isinstance(config, (SmoothQuant, Int8Dynamic)):

        def plan(m: nn.Module, fqn: str):
            if isinstance(m, nn.Embedding):
                spec = config.embedding_spec()
                return (FLOAT_TO_Q[nn.Embedding], spec) if spec is not None else None
            return QDynamicLinear, config.linear_spec()

        return plan, rtn
    return weight_plan(config), rounding(config.method)


def quantize_rest(
    model: nn.Module,
    path: str,
    config: QuantConfig,
    select: Callable[[str], bool],
    summary: QuantSummary,
    store: BlockStore,
) -> None:
    """Round the selected Linear/Embedding layers outside the blocks at ``path`` as ``rest_plan`` says
    (module docstring, step 3). Tables still on meta (a staged store's embedding and LM head) are
    rounded a row chunk at a time as ``store.table`` reads them (``swap.quantize_tables``); the store
    then reads in what else is needed (``store.load_rest``) and the others are rounded whole."""
    inside = path + "."
    outside = lambda fqn: select(fqn) and not fqn.startswith(inside)  # noqa: E731
    plan, quantize = rest_plan(config)
    meta = [n for n, m in model.named_modules() if type(m) in FLOAT_TO_Q and m.weight.is_meta]
    tables = [n for n in meta if not n.startswith(inside)]  # embedding first, as HF models list them
    quantize_tables(model, tables, plan, quantize, outside, summary, store.table)
    left = [m for n, m in model.named_modules() if type(m) in FLOAT_TO_Q and outside(n) and plan(m, n)]
    store.load_rest(model, path, left)
    swap_weights(model, plan, outside, summary, False, quantize)


def run_pipeline(
    model: nn.Module,
    path: str,
    config: QuantConfig,
    select: Callable[[str], bool],
    batches: list,
    store: BlockStore,
    summary: PipelineSummary,
    progress: bool,
    comm: Comm = SOLO,
) -> None:
    """Quantize ``model`` with ``config``: the decoder blocks at ``path`` (``run_blocks``), then the
    layers outside them (``quantize_rest``), the tensors coming from and going to ``store``; ``comm``:
    the ranks of a distributed run (``run_blocks``; every rank rounds the layers outside the blocks)."""
    run_blocks(model, path, block_plan(config), select, batches, store, summary, progress, comm)
    if comm.rank == 0 or store.rest_everywhere:
        quantize_rest(model, path, config, select, summary, store)


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
    model: nn.Module,
    config: QuantConfig,
    calib: Iterable | None,
    select: Selector,
    progress: bool,
    comm: Comm = SOLO,
) -> PipelineSummary:
    """Quantize a Hugging Face decoder in place, block by block (module docstring); with several ranks
    (``comm``), each passing the same model and batches, every rank ends with the same model."""
    plan = block_plan(config)
    batches = check_calib(config, calib)
    path = blocks_path(model, architecture(getattr(model, "config", None)))
    summary = pipeline_summary(config, plan, model)
    was_training = model.training
    model.eval()
    try:
        run_pipeline(model, path, config, select, batches, InMemoryStore(), summary, progress, comm)
    finally:
        model.train(was_training)
    merge_into(model, summary.basis)
    return summary


def run_blocks(
    model: nn.Module,
    path: str,
    plan: BlockPlan,
    select: Callable[[str], bool],
    batches: list,
    store: BlockStore,
    summary: PipelineSummary,
    progress: bool,
    comm: Comm = SOLO,
) -> None:
    """Quantize the decoder blocks at ``path`` in order (module docstring, steps 1-2), the blocks
    coming from and going to ``store`` (``lowbit.transforms.store``); the blocks ``store`` finished
    before are not run again, and calibration resumes from the inputs it kept for the next one.
    ``comm``: the ranks of a distributed run: each runs the blocks on its share of the calibration
    forwards; statistics are combined and the rounding dealt out (``block.quantize_block``)."""
    arch = architecture(getattr(model, "config", None))
    blocks = model.get_submodule(path)
    for i in range(store.done):
        merge(summary, store.result(i))
    if store.done == len(blocks):
        return
    cap, reference = None, None  # reference: the float model's own block inputs (``Training.target``)
    if plan.needs_data:
        with store.capturing(model):
            cap = capture(model, path, batches, comm)
        if plan.train is not None and plan.train.target == "model":
            reference = [h.clone() for h in cap.hidden]
        if store.done:  # staged: the next inputs, then the reference's (same count)
            staged, n = store.hidden(store.done), len(cap.hidden)
            cap.hidden, reference = staged[:n], (staged[n:] if reference is not None else None)
    quiet = not progress or comm.rank > 0
    bar = tqdm(range(store.done, len(blocks)), desc=plan.label, unit="block", disable=quiet)
    for i in bar:
        prefix, block, last = f"{path}.{i}", blocks[i], i + 1 == len(blocks)
        store.load(i, prefix, block)
        hidden, kwargs = (cap.hidden, cap.kwargs[i]) if cap else (None, None)
        res = quantize_block(block, prefix, plan, arch, select, hidden, kwargs, not last, comm, reference)
        store.commit(i, prefix, block, res, cap.hidden + (reference or []) if cap and not last else None)
        merge(summary, res)
        store.release(i, block)


def pipeline_summary(config: QuantConfig, plan: BlockPlan, model: nn.Module) -> PipelineSummary:
    """An empty summary of ``config`` that names the calibration forwards' dtype on ``model``'s device
    (the first parameter not on meta; CPU if none)."""
    summary = PipelineSummary(config)
    if plan.needs_data:
        p = next((p for p in model.parameters() if not p.is_meta), None)
        dtype = compute_dtype(plan.compute, "cpu" if p is None else p.device)
        summary.compute_dtype = str(dtype).removeprefix("torch.")
    return summary


def merge(summary: PipelineSummary, res: BlockResult) -> None:
    summary.quantized.update(res.quantized)
    summary.uncalibrated.update(res.uncalibrated)
    summary.scaled.update(res.scaled)
    summary.trained.update(res.trained)
    for fqn, entry in res.basis.items():
        record(summary.basis, fqn, **entry)


@register_handler(SmoothQuant, distributed=True)
def smoothquant(
    model: nn.Module, config: SmoothQuant, calib, select: Selector, progress: bool, comm: Comm = SOLO
):
    """SmoothQuant scales folded block by block, then W8A8 dynamic layers (``QDynamicLinear``)."""
    return quantize_sequential(model, config, calib, select, progress, comm)


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder ``quantize_sequential`` can walk block by block."""
    try:
        blocks_path(model, architecture(getattr(model, "config", None)))
    except LowbitError:
        return False
    return True
