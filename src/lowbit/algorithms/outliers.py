"""LLM.int8 (Dettmers et al. 2022) outlier split: a few input channels stay in float, the rest go int8.

Input channels whose calibrated max ``|x|`` exceeds ``threshold`` (6.0 in the paper) are outliers.
A Linear ``y = x @ W.T`` then splits exactly by columns::

    y = x[..., rest] @ W[:, rest].T + x[..., outlier] @ W[:, outlier].T

where the first product runs W8A8 and the second in float. ``max_fraction`` caps the outlier count so a
badly calibrated layer cannot push most of its columns to float.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.primitives import check_finite

Tensor = torch.Tensor


def outlier_channels(act_absmax: Tensor, *, threshold: float = 6.0, max_fraction: float = 0.01) -> Tensor:
    """Sorted int64 indices of channels with ``act_absmax (in,) > threshold``; when more than
    ``floor(max_fraction * in)`` qualify, the largest ones are kept."""
    if act_absmax.dim() != 1:
        raise LowbitError(f"act_absmax must be 1-d (in,), got shape {tuple(act_absmax.shape)}")
    if not 0.0 <= max_fraction <= 1.0:
        raise LowbitError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if not threshold >= 0:
        raise LowbitError(f"threshold must be >= 0, got {threshold}")
    check_finite(act_absmax, "act_absmax")
    a = act_absmax.detach().float()
    cap = math.floor(max_fraction * a.numel() + 1e-9)
    over = torch.nonzero(a > threshold).reshape(-1)
    if over.numel() > cap:
        over = over[torch.argsort(a[over], descending=True, stable=True)[:cap]]
    return torch.sort(over).values.to(torch.int64)


def rest_channels(n: int, idx: Tensor) -> Tensor:
    """Sorted int64 indices of ``range(n)`` not in ``idx``; ``idx`` must be unique and in range."""
    idx = idx.reshape(-1).to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise LowbitError(f"outlier indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
    keep = torch.ones(n, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    if int(keep.sum()) != n - idx.numel():
        raise LowbitError("outlier indices must be unique")
    return torch.nonzero(keep).reshape(-1)


def split_columns(weight: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(W[:, idx] (out, k), W[:, rest] (out, in - k), rest (in - k,) int64)`` of ``weight (out, in)``."""
    if weight.dim() != 2:
        raise LowbitError(f"weight must be 2-d (out, in), got shape {tuple(weight.shape)}")
    idx = idx.reshape(-1).to(weight.device, torch.int64)
    rest = rest_channels(weight.shape[1], idx)
    return weight[:, idx], weight[:, rest], rest
