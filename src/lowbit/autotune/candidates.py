"""Per-layer candidate formats of a mixed-precision plan, and what each costs in real checkpoint bytes.

A candidate is written like a weight-only scheme: ``w<bits>[g<group>][-sym]`` (``w3g64``, ``w4g128``,
``w8`` = one scale per output channel), or a scale-only format with an optional group: ``nf4g64``,
``fp4g32``, ``fp8``, ``log2g64``, ``ternaryg64``, or ``kmeans<bits>`` (bits 2..4: a fitted table per
output channel; ``WeightOnly.format``). Its cost on a ``(rows, cols)`` weight is what ``QLinear``
stores: the bit-packed codes (``rows * stored_bytes(cols)``), the scales (``scale_dtype``), for int
formats the zero points (one byte each, stored even when symmetric), for kmeans the tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lowbit.core.codec import stored_bytes
from lowbit.core.errors import LowbitError
from lowbit.core.formats import get_format
from lowbit.core.spec import QuantSpec, qparam_shape
from lowbit.transforms.configs import FORMAT_NAME, WEIGHT_FORMATS, weight_spec

_NAME = re.compile(r"w([2-8])(?:g(\d+))?(-sym|-asym)?")
DEFAULT_CANDIDATES = ("w2g64", "w3g128", "w3g64", "w4g128", "w4g64", "w5g128", "w6g128", "w8")


@dataclass(frozen=True)
class Candidate:
    """One weight format: ``bits`` 2..8, ``group_size`` (None: per output channel), ``symmetric``;
    ``format`` a ``WeightOnly.format`` ("int", or a scale-only format whose bits ``bits`` must be)."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    format: str = "int"

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        if self.format == "kmeans":
            return f"kmeans{self.bits}"
        if self.format != "int":
            return f"{self.format}{group}"
        return f"w{self.bits}{group}{'-sym' if self.symmetric else ''}"

    def spec(self, scale_dtype: str = "float16") -> QuantSpec:
        """The ``QuantSpec`` of this candidate (as ``WeightOnly`` builds it)."""
        return weight_spec(self.bits, self.group_size, self.symmetric, scale_dtype, self.format)

    def fits(self, shape: tuple[int, int]) -> bool:
        """Whether a ``(rows, cols)`` weight can take this candidate: a group no wider than a row (a
        last, partial group is fine: SmolLM2's 576 columns in groups of 128)."""
        return not self.group_size or self.group_size <= shape[1]

    def nbytes(self, shape: tuple[int, int], scale_dtype: str = "float16") -> int:
        """Stored bytes of a ``(rows, cols)`` weight in this format: codes, scales and zero points."""
        spec = self.spec(scale_dtype)
        rows, cols = shape
        n_qparams = math.prod(qparam_shape(tuple(shape), spec.block_size(tuple(shape))))
        scale_bytes = torch.empty((), dtype=spec.torch_scale_dtype).element_size()
        zp_bytes = 1 if spec.fmt.kind == "int" else 0
        table_bytes = rows * spec.fmt.n_codes * scale_bytes if spec.fmt.kind == "table" else 0
        return rows * stored_bytes(cols, spec.fmt) + n_qparams * (scale_bytes + zp_bytes) + table_bytes

    def entry(self) -> dict:
        """This candidate as a ``WeightOnly.layers`` entry."""
        if self.format == "kmeans":
            return {"format": "kmeans", "bits": self.bits}
        if self.format != "int":
            return {"format": self.format, "group_size": self.group_size or 0}
        return {"bits": self.bits, "group_size": self.group_size or 0, "symmetric": self.symmetric}


def parse_candidate(name: str) -> Candidate:
    """``Candidate`` from ``w<bits>[g<group>][-sym|-asym]``, ``<format>[g<group>]`` (nf4, fp4, fp8, log2,
    ternary) or ``kmeans<bits>``; ``LowbitError`` naming the bad text."""
    text = name.strip()
    m, other = _NAME.fullmatch(text), FORMAT_NAME.fullmatch(text)
    if other and other["km"]:
        return Candidate(int(other["bits"]), None, True, "kmeans")
    group_text = (m.group(2) if m else other["group"]) if (m or other) else None
    if not (m or other) or (group_text is not None and int(group_text) < 1):
        raise LowbitError(
            f"bad candidate {name!r}: write w<bits>[g<group>][-sym] with bits 2..8 (w3g64, w4g128, w8), or "
            "nf4, fp4, fp8, log2, ternary with an optional g<group> (nf4g64), or kmeans2..kmeans4"
        )
    group = int(group_text) if group_text else None
    if other:
        fmt = other["fmt"]
        return Candidate(get_format(WEIGHT_FORMATS[fmt]).bits, group, True, fmt)
    return Candidate(int(m.group(1)), group, m.group(3) == "-sym")


def parse_candidates(names: str | list[str]) -> list[Candidate]:
    """Candidates from a comma-separated string or a list of names, duplicates dropped, order kept."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    out = list(dict.fromkeys(parse_candidate(p) for p in parts if p.strip()))
    if not out:
        raise LowbitError("no candidate formats given (e.g. w2g64,w3g64,w4g128,w8)")
    return out
