"""Scheme strings for the CLI and reports: ``w{bits}[g{group}][e{bits}][-sym|-asym]``.

| scheme       | meaning                                                           |
|--------------|-------------------------------------------------------------------|
| `w8`         | int8 symmetric, one scale per output channel (embeddings per row) |
| `w4g128`     | uint4 asymmetric, groups of 128 along the input dimension         |
| `w4g64-sym`  | int4 symmetric, groups of 64                                      |
| `w4g128e8`   | as w4g128, but embedding tables (and a tied LM head) 8-bit per row |

Without a suffix, 8-bit schemes are symmetric and lower bit widths asymmetric. Bits: 2..8.
Without ``e``, embeddings use the Linear layers' bits and group size.
"""

from __future__ import annotations

import re

from lowbit.core.errors import LowbitError
from lowbit.transforms.configs import WeightOnly

_SCHEME = re.compile(r"w(?P<bits>\d)(?:g(?P<group>\d+))?(?:e(?P<emb>\d))?(?P<sym>-sym|-asym)?")


def parse_scheme(scheme: str) -> WeightOnly:
    """``WeightOnly`` config for a scheme string (table in the module docstring)."""
    m = _SCHEME.fullmatch(scheme.strip().lower())
    if not m:
        raise LowbitError(
            f"unknown scheme {scheme!r}; expected w<bits>[g<group>][-sym|-asym], e.g. w8, w4g128"
        )
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else None
    symmetric = m["sym"] == "-sym" if m["sym"] else bits == 8
    if m["emb"]:
        return WeightOnly(bits, group, symmetric, embedding_bits=int(m["emb"]), embedding_group_size=0)
    return WeightOnly(bits=bits, group_size=group, symmetric=symmetric)
