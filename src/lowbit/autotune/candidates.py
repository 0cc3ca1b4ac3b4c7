"""Per-layer candidate formats of a mixed-precision plan, and what each costs in real checkpoint bytes.

A candidate is written like a weight-only scheme: ``w<bits>[g<group>][-sym]`` (``w3g64``, ``w4g128``,
``w8`` = one scale per output channel). Its cost on a ``(rows, cols)`` weight is what ``QLinear`` stores:
the bit-packed codes (``rows * stored_bytes(cols)``), the scales (``scale_dtype``) and the zero points (one
byte each; int formats store them even when symmetric).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lowbit.core.codec import stored_bytes
from lowbit.core.errors import LowbitError
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec, qparam_shape

_NAME = re.compile(r"w([2-8])(?:g(\d+))?(-sym|-asym)?")
DEFAULT_CANDIDATES = ("w2g64", "w3g128", "w3g64", "w4g128", "w4g64", "w5g128", "w6g128", "w8")


@dataclass(frozen=True)
class Candidate:
    """One weight format: ``bits`` 2..8, ``group_size`` (None: per output channel), ``symmetric``."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        return f"w{self.bits}{group}{'-sym' if self.symmetric else ''}"

    def spec(self, scale_dtype: str = "float16") -> QuantSpec:
        """The ``QuantSpec`` of this candidate (as ``WeightOnly`` builds it)."""
        fmt = f"int{self.bits}" if self.symmetric else f"uint{self.bits}"
        gran = PerGroup(self.group_size) if self.group_size else PerChannel(0)
        return QuantSpec(fmt, self.symmetric, gran, scale_dtype)

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
        return rows * stored_bytes(cols, spec.fmt) + n_qparams * (scale_bytes + 1)

    def entry(self) -> dict:
        """This candidate as a ``WeightOnly.layers`` entry."""
        return {"bits": self.bits, "group_size": self.group_size or 0, "symmetric": self.symmetric}


def parse_candidate(name: str) -> Candidate:
    """``Candidate`` from ``w<bits>[g<group>][-sym|-asym]``; ``LowbitError`` naming the bad text."""
    m = _NAME.fullmatch(name.strip())
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise LowbitError(
            f"bad candidate {name!r}: write w<bits>[g<group>][-sym] with bits 2..8, e.g. w3g64, w4g128, w8"
        )
    group = int(m.group(2)) if m.group(2) else None
    return Candidate(int(m.group(1)), group, m.group(3) == "-sym")


def parse_candidates(names: str | list[str]) -> list[Candidate]:
    """Candidates from a comma-separated string or a list of names, duplicates dropped, order kept."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    out = list(dict.fromkeys(parse_candidate(p) for p in parts if p.strip()))
    if not out:
        raise LowbitError("no candidate formats given (e.g. w2g64,w3g64,w4g128,w8)")
    return out
