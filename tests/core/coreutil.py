"""Helpers shared by the lowbit.core tests (independent of ``lowbit.core.primitives`` internals)."""

from __future__ import annotations

import torch

from lowbit.core import PerChannel, PerGroup, PerTensor, PerToken
from lowbit.core.spec import qparam_shape

# (id, shape, granularity): every granularity, including groups that do not divide the dimension.
LAYOUTS = [
    ("tensor-4x24", (4, 24), PerTensor()),
    ("channel0-5x16", (5, 16), PerChannel(0)),
    ("channel1-6x7", (6, 7), PerChannel(1)),
    ("group128-3x576", (3, 576), PerGroup(128)),
    ("group32-4x100", (4, 100), PerGroup(32)),
    ("group8-axis0-13x3", (13, 3), PerGroup(8, axis=0)),
    ("token-2x3x20", (2, 3, 20), PerToken()),
    ("tensor-1d-13", (13,), PerTensor()),
]
LAYOUT_IDS = [lay[0] for lay in LAYOUTS]


def expand(p: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """Per-block qparams ``(ceil(shape / block))`` -> one value per element of ``shape``."""
    assert tuple(p.shape) == qparam_shape(tuple(shape), tuple(block))
    for dim, (s, b) in enumerate(zip(shape, block, strict=True)):
        p = p.repeat_interleave(b, dim).narrow(dim, 0, s)
    return p


def block_corners(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the first and the last element of every block (the last one of a partial block is real)."""
    first = torch.ones(shape, dtype=torch.bool)
    last = torch.ones(shape, dtype=torch.bool)
    for dim, (s, b) in enumerate(zip(shape, block, strict=True)):
        idx = torch.arange(s)
        view = [1] * len(shape)
        view[dim] = s
        first &= (idx % b == 0).reshape(view)
        last &= ((idx % b == b - 1) | (idx == s - 1)).reshape(view)
    return first, last
