"""compressed-tensors folders (llm-compressor's output) imported into lowbit ``QLinear`` layers.

Each ``config_groups`` scheme (``targets``: module names, ``re:`` patterns or the class name ``Linear``;
``ignore`` likewise) maps to a lowbit spec, its tensors (layouts in ``lowbit.export.compressed_tensors``)
to lowbit's codes: compressed-tensors' signed codes ``q`` and zero points ``z`` become unsigned codes
``q + 2**(b-1)`` with zero point ``z + 2**(b-1)`` (symmetric: ``2**(b-1)``, so ``int{b}`` codes ``q``),
and ``(q - z) * s`` is unchanged. Imported: int weights of 2, 4 or 8 bits (fields that fill int32 words),
per tensor, per channel or per group, symmetric or not, formats pack-quantized, int-quantized and
naive-quantized; W8A8 with dynamic per-token activations becomes ``QDynamicLinear``, whose activation
codes follow lowbit's rule (per-token asymmetric uint8) whatever the folder's activation symmetry.
Refused with a message: float formats (fp8, nvfp4, mxfp4), static activation scales, output or KV-cache
quantization, sparsity and transform (rotation) configs, act-order with a permuted ``g_idx``.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import nn

from lowbit.core.errors import CheckpointError
from lowbit.export.peer_formats import (
    FLOATS,
    PeerLayout,
    PeerTensors,
    check_g_idx,
    qlinear_from_codes,
    unpack_words,
)
from lowbit.nn.dynamic import QDynamicLinear

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
STRATEGIES = ("tensor", "channel", "group")


def _scheme(name: str, group: dict, default_fmt: str, where: str) -> dict:
    """One config group, validated: {"targets", "bits", "sym", "strategy", "group", "format", "dynamic"}."""
    here = f"{where} config_groups.{name}"
    w, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or default_fmt
    if fmt not in FORMATS:
        raise CheckpointError(f"{here}: format {fmt!r} not supported; lowbit imports {', '.join(FORMATS)}")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    if w.get("type") != "int" or bits not in (2, 4, 8) or strategy not in STRATEGIES:
        raise CheckpointError(
            f"{here}: weights {w.get('type')} {bits}-bit {strategy} not supported; lowbit imports int "
            f"weights of 2, 4 or 8 bits per {', '.join(STRATEGIES)}"
        )
    size = w.get("group_size")
    if strategy == "group" and not (isinstance(size, int) and size > 0):
        raise CheckpointError(f"{here}: group strategy with group_size {size!r}")
    if group.get("output_activations"):
        raise CheckpointError(f"{here}: output activation quantization is not imported")
    dynamic = acts is not None
    if dynamic and not (
        acts.get("dynamic") is True and acts.get("strategy") == "token" and acts.get("num_bits") == 8
    ):
        raise CheckpointError(
            f"{here}: input activations {acts.get('strategy')} dynamic={acts.get('dynamic')} not imported; "
            "lowbit imports weight-only schemes and W8A8 with dynamic per-token activations"
        )
    targets = group.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
        raise CheckpointError(f"{here}: targets must be a list of strings")
    return {"targets": targets, "bits": bits, "sym": bool(w.get("symmetric", True)), "strategy": strategy,
            "group": size if strategy == "group" else -1, "format": fmt, "dynamic": dynamic}  # fmt: skip


def _matches(pattern: str, fqn: str) -> bool:
    """compressed-tensors' target rule for a Linear: its name, ``re:`` + a pattern, or its class."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], fqn) is not None
    return pattern in (fqn, "Linear")


def compressed_tensors_layout(qcfg: dict, where: str) -> PeerLayout:
    """The layout of a compressed-tensors ``quantization_config`` (quant_method "compressed-tensors")."""
    for key in ("sparsity_config", "transform_config"):
        if qcfg.get(key):
            raise CheckpointError(f"{where}: {key} is not imported (lowbit imports dense quantized weights)")
    if qcfg.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: kv_cache_scheme (quantized KV cache) is not imported")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: config_groups is missing or empty")
    default_fmt = qcfg.get("format") or "pack-quantized"
    schemes = [
        _scheme(str(n), g if isinstance(g, dict) else {}, default_fmt, where) for n, g in groups.items()
    ]
    ignore = qcfg.get("ignore") or []
    summary = {"type": "imported", "quant_method": "compressed-tensors", "format": default_fmt,
               "schemes": [{k: v for k, v in s.items() if k != "targets"} for s in schemes]}  # fmt: skip
    return PeerLayout(summary, partial(_layer, schemes=schemes, ignore=ignore))


def _layer(
    fqn: str, linear: nn.Linear, t: PeerTensors, *, schemes: list[dict], ignore: list
) -> nn.Module | None:
    stored = f"{fqn}.weight_scale" in t
    chosen = [s for s in schemes if any(_matches(p, fqn) for p in s["targets"])]
    if any(_matches(p, fqn) for p in ignore if p != "Linear") or not chosen:
        if stored:
            raise CheckpointError(f"{t.folder}: {fqn} is stored quantized, but no config group targets it")
        return None
    if not stored:
        raise CheckpointError(
            f"{t.folder}: tensor {fqn}.weight_scale is missing (its config group targets it)"
        )
    s = chosen[-1]  # compressed-tensors: the last matching group wins
    n_out, n_in, bits = linear.out_features, linear.in_features, s["bits"]
    n_groups = math.ceil(n_in / s["group"]) if s["strategy"] == "group" else 1
    why = f"{n_in} inputs, {n_out} outputs, {bits}-bit {s['strategy']} {s['format']}"
    scales = t.get(f"{fqn}.weight_scale", (n_out, n_groups), FLOATS, why)
    codes, zeros = _codes(fqn, t, s, n_out, n_in, n_groups, why)
    if f"{fqn}.weight_g_idx" in t:
        check_g_idx(t, f"{fqn}.weight_g_idx", n_in, s["group"] if s["group"] > 0 else n_in, why, "act-order")
    if s["dynamic"] and not (bits == 8 and s["sym"] and s["strategy"] == "channel"):
        raise CheckpointError(f"{t.folder}: {fqn}: W8A8 needs int8 symmetric per-channel weights ({why})")
    group = s["group"] if s["strategy"] == "group" else -1
    kw = {"cls": QDynamicLinear} if s["dynamic"] else {}
    return qlinear_from_codes(fqn, linear, t, bits, group, s["sym"], codes, zeros, scales, **kw)


def _codes(fqn: str, t: PeerTensors, s: dict, n_out: int, n_in: int, n_groups: int, why: str):
    """(unsigned codes ``(out, in)``, unsigned zero points ``(out, groups)``) of one layer."""
    bits, mid = s["bits"], 1 << (s["bits"] - 1)
    if s["format"] == "pack-quantized":
        words = t.get(f"{fqn}.weight_packed", (n_out, math.ceil(n_in * bits / 32)), (torch.int32,), why)
        if f"{fqn}.weight_shape" in t:
            shape = t.get(f"{fqn}.weight_shape", (2,), (torch.int32, torch.int64), why)
            if shape.tolist() != [n_out, n_in]:
                raise CheckpointError(
                    f"{t.folder}: {fqn}.weight_shape {shape.tolist()} is not [{n_out}, {n_in}]"
                )
        codes = unpack_words(words, bits)[:, :n_in]
    else:
        codes = (t.get(f"{fqn}.weight", (n_out, n_in), (torch.int8,), why).to(torch.int16) + mid).to(
            torch.uint8
        )
    if s["sym"]:
        return codes, torch.full((n_out, n_groups), mid, dtype=torch.uint8)
    name = f"{fqn}.weight_zero_point"
    if s["format"] == "pack-quantized":
        zp = t.get(name, (math.ceil(n_out * bits / 32), n_groups), (torch.int32,), why)
        return codes, unpack_words(zp.t().contiguous(), bits)[:, :n_out].t().contiguous()
    zp = t.get(name, (n_out, n_groups), (torch.int8,), why)
    return codes, (zp.to(torch.int16) + mid).to(torch.uint8)
