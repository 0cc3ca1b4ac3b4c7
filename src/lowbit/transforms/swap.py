"""Module swap: replace float Linear/Embedding layers by quantized modules, tied weights shared.

Used by every handler that rounds layers on their own (``WeightOnly`` without data, ``Int8Dynamic``),
by the block pipeline for the layers outside the blocks (``lowbit.transforms.sequential``). Tables
still on the meta device (a streamed run's embedding and LM head) are rounded a row chunk at a time
from a row reader instead (``quantize_tables``): the same chunks as ``by_rows``, so bitwise the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import QuantizedTensor, rtn
from lowbit.core.codec import encode
from lowbit.core.heap import trim_heap
from lowbit.core.spec import QuantSpec
from lowbit.nn.modules import FLOAT_TO_Q, QuantizedWeightModule
from lowbit.transforms.configs import WeightOnly
from lowbit.transforms.quantize import QuantSummary

# (module, its fqn) -> (quantized class, spec), or None to keep the module float
Plan = Callable[[nn.Module, str], "tuple[type[QuantizedWeightModule], QuantSpec] | None"]
Rounding = Callable[[torch.Tensor, QuantSpec, str], QuantizedTensor]
Rows = Callable[[int, int], torch.Tensor]  # (start, stop) -> rows start:stop of one table
Table = Callable[[str, "tuple[int, int]"], Rows]  # (key, shape) -> row reader of that table
CHUNK_ROWS = 8192  # rows rounded at once when blocks lie within rows (bounds a big embedding's temporaries)


def weight_plan(config: WeightOnly) -> Plan:
    """``plan`` for ``swap_weights``: QLinear with the Linear spec of its fqn, QEmbedding with the
    embedding spec of its fqn (``WeightOnly.layers`` entries over the config's own)."""

    def plan(m: nn.Module, fqn: str):
        spec = config.embedding_spec(fqn) if isinstance(m, nn.Embedding) else config.linear_spec(fqn)
        return (FLOAT_TO_Q[type(m)], spec) if spec is not None else None

    return plan


def rounding(method: str) -> Rounding:
    """``(weight, spec, name) -> QuantizedTensor`` of a calibration-free method: "hqq", else RTN."""
    if method == "hqq":
        from lowbit.algorithms.hqq import hqq

        return lambda w, spec, name: hqq(w, spec, name=name)
    return rtn


def by_rows(quantize: Rounding, weight: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedTensor:
    """``quantize(weight, spec, name)`` over ``CHUNK_ROWS`` rows at a time when ``spec``'s blocks lie
    within rows (per-channel / per-group): the same result for RTN, a fraction of the temporaries for
    an embedding table. (HQQ's early stop then applies per chunk.)"""
    if weight.dim() != 2 or weight.shape[0] <= CHUNK_ROWS or spec.block_size(tuple(weight.shape))[0] != 1:
        return quantize(weight, spec, name)
    parts = [quantize(rows, spec, name) for rows in weight.split(CHUNK_ROWS)]
    zp = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts])
    levels = None if parts[0].levels is None else torch.cat([p.levels for p in parts])
    codes, scale = torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts])
    return QuantizedTensor(codes, scale, zp, spec, levels)


def swap_weights(
    model: nn.Module,
    plan: Plan,
    select: Callable[[str], bool],
    summary: QuantSummary,
    progress: bool,
    quantize: Rounding = rtn,
) -> QuantSummary:
    """Replace each selected Linear/Embedding ``m`` by ``cls`` with weights from ``quantize`` (RTN by
    default), ``(cls, spec) = plan(m, fqn)`` (None keeps it float). A weight tied to an earlier one is
    quantized once, by the first owner's spec."""
    targets = []
    for fqn, m in model.named_modules():
        if type(m) not in FLOAT_TO_Q or not select(fqn):
            continue
        choice = plan(m, fqn)
        if choice is None:
            summary.skipped[fqn] = "embeddings kept float by config"
            continue
        targets.append((fqn, m, *choice))
    done: dict[int, tuple[str, QuantizedWeightModule]] = {}  # id(float weight) -> first quantized owner
    for fqn, m, cls, spec in tqdm(targets, desc="quantize", unit="layer", disable=not progress):
        fill = partial(_set_rows, quantize=quantize, weight=m.weight, name=f"{fqn}.weight")
        q = swap_module(model, fqn, m, cls, spec, done.get(id(m.weight)), fill, summary)
        done.setdefault(id(m.weight), (fqn, q))
    return summary


def _set_rows(q: QuantizedWeightModule, quantize: Rounding, weight: torch.Tensor, name: str) -> None:
    q.set_weight(by_rows(quantize, weight.detach(), q.spec, name))


def swap_module(
    model: nn.Module,
    fqn: str,
    m: nn.Module,
    cls: type[QuantizedWeightModule],
    spec: QuantSpec,
    owner: tuple[str, QuantizedWeightModule] | None,
    fill: Callable[[QuantizedWeightModule], None],
    summary: QuantSummary,
) -> QuantizedWeightModule:
    """Put ``cls.from_float(m)`` at ``fqn``: sharing ``owner``'s weight (``(fqn, module)`` of a tied
    weight quantized before, recorded in ``summary.tied``) or given its weight by ``fill(q)``; the bias
    copied; recorded in ``summary.quantized``."""
    if owner is not None:
        q = cls.from_float(m, owner[1].spec)
        q.share_weight(owner[1])
        summary.tied[fqn] = owner[0]
    else:
        q = cls.from_float(m, spec)
        fill(q)
    if getattr(m, "bias", None) is not None:
        q.bias = m.bias.detach().clone()
    model.set_submodule(fqn, q)
    summary.quantized[fqn] = q.extra_repr()
    return q


def _fill(q: QuantizedWeightModule, quantize: Rounding, table: Table, key: str, dtype, name: str) -> None:
    """``q.set_weight(by_rows(quantize, weight, ...))`` with the weight read ``CHUNK_ROWS`` rows at a
    time by ``table(key, shape)``: the same chunks, so the same codes and qparams, bitwise."""
    rows = table(key, (q.rows, q.cols))
    step = CHUNK_ROWS if q.rows > CHUNK_ROWS else max(q.rows, 1)
    scales, zps = [], []
    for a in range(0, q.rows, step):
        qt = quantize(rows(a, a + step).to(dtype), q.spec, name)
        q.qweight[a : a + step] = encode(qt.codes, q.spec.fmt)
        scales.append(qt.scale)
        zps.append(qt.zero_point)
        del qt
        trim_heap()  # the chunk's temporaries (a few times 29 MB for Qwen2.5) would stay on the heap
    q.scale = torch.cat(scales).contiguous()
    q.zero_point = None if zps[0] is None else torch.cat(zps).contiguous()


def quantize_tables(
    model: nn.Module,
    fqns: list[str],
    plan: Plan,
    quantize: Rounding,
    select: Callable[[str], bool],
    summary: QuantSummary,
    table: Table,
) -> None:
    """Swap the modules ``fqns`` (embedding, LM head; weights on meta) for quantized ones filled a row
    chunk at a time by ``table`` (``(key, shape) -> (start, stop) -> rows``, key: the first owner's
    ``<fqn>.weight``), exactly as ``swap_weights(model, plan, select, summary, ..., quantize)`` would
    from the float tables (ties shared). Only for specs whose blocks lie within rows: other specs, and
    weights tied to them, stay on meta for the whole-tensor path. A bias must have been read in."""
    keys: dict[int, str] = {}  # id(meta weight) -> key of its first owner
    done: dict[int, tuple[str, QuantizedWeightModule]] = {}
    left: set[int] = set()  # id(meta weight) left for the whole-tensor path
    for fqn in fqns:
        m = model.get_submodule(fqn)
        wid = id(m.weight)
        keys.setdefault(wid, f"{fqn}.weight")
        usable = type(m) in FLOAT_TO_Q and m.weight.is_meta and select(fqn)
        choice = plan(m, fqn) if usable else None
        if choice is None:
            continue
        cls, spec = choice
        owner = done.get(wid)
        if wid in left or (owner is None and spec.block_size(tuple(m.weight.shape))[0] != 1):
            left.add(wid)
            continue
        fill = partial(_fill, quantize=quantize, table=table, key=keys[wid], dtype=m.weight.dtype,
                       name=f"{fqn}.weight")  # fmt: skip
        q = swap_module(model, fqn, m, cls, spec, owner, fill, summary)
        done.setdefault(wid, (fqn, q))
