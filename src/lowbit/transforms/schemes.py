"""Scheme strings for the CLI and reports: ``w{bits}[g{group}][e{bits}[g{group}]][-sym|-asym]``.

| scheme       | meaning                                                           |
|--------------|-------------------------------------------------------------------|
| `w8`         | int8 symmetric, one scale per output channel (embeddings per row) |
| `w4g128`     | uint4 asymmetric, groups of 128 along the input dimension         |
| `w4g64-sym`  | int4 symmetric, groups of 64                                      |
| `w4g128e8`   | as w4g128, but embedding tables (and a tied LM head) 8-bit per row |
| `w4g32e8g32-sym` | int4 sym. in groups of 32, embeddings int8 sym. in groups of 32 (a GGUF Q4_0 file) |
| `w8a8`       | ``Int8Dynamic()``: int8 weights per channel, int8 activations per token |
| `w8a8-static`| ``StaticW8A8()``: activation ranges fixed by calibration (needs data) |
| `w4a8-static`| ``StaticW8A8(weight_bits=4)``: int4 per-channel weights (any of 2..8)  |
| `nf4g64`     | ``WeightOnly(format="nf4", group_size=64)``; also fp4, fp8, log2, ternary [g<group>] |
| `kmeans3`    | ``WeightOnly(format="kmeans", bits=3)``: a fitted 8-level table per output channel |
| `plan:FILE`  | the config in a JSON file (``lowbit autotune``'s plan.json, or a config dict) |

Without a suffix, 8-bit schemes are symmetric and lower bit widths asymmetric. Bits: 2..8; group sizes
1..``MAX_GROUP``.
Without ``e``, embeddings use the Linear layers' bits and group size.

``method`` picks the algorithm: for weight-only schemes one of ``WEIGHT_METHODS`` (``rtn``, ``hqq``,
``gptq``, ``awq``, ``awq+gptq``), for ``w8a8`` ``smoothquant`` (``SmoothQuant()``), for
``w<b>a8-static`` one of ``STATIC_ROUNDINGS`` (``adaround``, ``brecq``: learned rounding); ``rtn`` is
the default everywhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from lowbit.core.errors import LowbitError
from lowbit.transforms.configs import (
    FORMAT_NAME,
    WEIGHT_METHODS,
    Int8Dynamic,
    QuantConfig,
    SmoothQuant,
    StaticW8A8,
    WeightOnly,
    config_from_dict,
)

MAX_GROUP = 1 << 20
STATIC_ROUNDINGS = ("adaround", "brecq")
_STATIC = re.compile(r"w(?P<bits>\d)a8-static")
_SCHEME = re.compile(
    r"w(?P<bits>\d)(?:g(?P<group>\d+))?(?:e(?P<emb>\d)(?:g(?P<egroup>\d+))?)?(?P<sym>-sym|-asym)?"
)


def parse_scheme(scheme: str, method: str | None = None) -> QuantConfig:
    """The config a scheme string names (table in the module docstring), using ``method`` (None: rtn)."""
    config = _parse(scheme)
    known = (*WEIGHT_METHODS, "smoothquant", *STATIC_ROUNDINGS)
    if method is not None and method not in known:
        raise LowbitError(f"unknown method {method!r}; known: {', '.join(known)}")
    if method is None or method == "rtn":
        return config
    if isinstance(config, WeightOnly) and method in WEIGHT_METHODS:
        return replace(config, method=method)
    if isinstance(config, StaticW8A8) and method in STATIC_ROUNDINGS:
        return replace(config, rounding=method)
    if isinstance(config, Int8Dynamic) and method == "smoothquant":
        return SmoothQuant(scale_dtype=config.scale_dtype, quantize_embeddings=config.quantize_embeddings)
    raise LowbitError(
        f"method {method!r} does not apply to scheme {scheme!r}; weight-only schemes take "
        f"{', '.join(WEIGHT_METHODS)}; w8a8 takes rtn or smoothquant; w<b>a8-static takes rtn, "
        f"{' or '.join(STATIC_ROUNDINGS)}"
    )


def config_from_file(path: str | Path) -> QuantConfig:
    """The config in JSON file ``path``: a plan file's "config" entry (``lowbit autotune``'s plan.json),
    or a ``QuantConfig.to_dict()`` dict; validated by ``config_from_dict``."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: not a readable JSON config or plan ({e})") from None
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        record = record["config"]
    if not isinstance(record, dict):
        raise LowbitError(f'{path}: expected a JSON object (a config, or a plan with a "config" entry)')
    return config_from_dict(record)


def _parse(scheme: str) -> QuantConfig:
    if scheme.strip().startswith("plan:"):
        return config_from_file(scheme.strip()[5:])
    if scheme.strip().lower() == "w8a8":
        return Int8Dynamic()
    static = _STATIC.fullmatch(scheme.strip().lower())
    if static:
        if not 2 <= int(static["bits"]) <= 8:
            raise LowbitError(f"scheme {scheme!r}: weight bits must be 2..8")
        return StaticW8A8(weight_bits=int(static["bits"]))
    other = FORMAT_NAME.fullmatch(scheme.strip().lower())
    if other:
        if other["km"]:
            return WeightOnly(format="kmeans", bits=int(other["bits"]), group_size=None)
        group = int(other["group"]) if other["group"] else None
        if group is not None and not 1 <= group <= MAX_GROUP:
            raise LowbitError(f"scheme {scheme!r}: group size must be 1..{MAX_GROUP}")
        return WeightOnly(format=other["fmt"], group_size=group)
    m = _SCHEME.fullmatch(scheme.strip().lower())
    if not m:
        raise LowbitError(
            f"unknown scheme {scheme!r}; expected w<bits>[g<group>][e<bits>[g<group>]][-sym|-asym], w8a8, "
            "w8a8-static, nf4|fp4|fp8|log2|ternary[g<group>] or kmeans2..kmeans4, e.g. w8, w4g128, nf4g64"
        )
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else None
    if not 2 <= bits <= 8 or (m["emb"] and not 2 <= int(m["emb"]) <= 8):
        raise LowbitError(f"scheme {scheme!r}: bit widths must be 2..8")
    egroup = int(m["egroup"]) if m["egroup"] else 0  # 0: one scale per embedding row
    if (group is not None and not 1 <= group <= MAX_GROUP) or not 0 <= egroup <= MAX_GROUP:
        raise LowbitError(f"scheme {scheme!r}: group size must be 1..{MAX_GROUP}")
    symmetric = m["sym"] == "-sym" if m["sym"] else bits == 8
    if m["emb"]:
        return WeightOnly(bits, group, symmetric, embedding_bits=int(m["emb"]), embedding_group_size=egroup)
    return WeightOnly(bits=bits, group_size=group, symmetric=symmetric)
