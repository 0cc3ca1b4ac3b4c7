"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
Bias Correction", sec. 4.1): pure math on the weights of two consecutive layers.

For ``y = W2 f(W1 x + b1)`` with ``f`` positively homogeneous (identity, ReLU: ``f(x / s) = f(x) / s``
for ``s > 0``), dividing output channel ``i`` of layer 1 by ``s_i`` and multiplying input channel ``i``
of layer 2 by ``s_i`` keeps ``y`` exactly. With per-channel weight ranges ``r1_i = max |W1[i, ...]|``
and ``r2_i = max |W2[:, i, ...]|``, the choice

    s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i)

makes both ranges ``sqrt(r1_i * r2_i)``: channel ``i`` gets the same share of both layers' ranges.
Channels with a zero range on either side keep ``s_i = 1``.

Layer 2 may be grouped (depthwise included): its input channel ``i`` belongs to group
``i // (in / groups)`` and is column ``i % (in / groups)`` of that group's output rows.
"""

from __future__ import annotations

import torch

from lowbit.core.errors import LowbitError

Tensor = torch.Tensor


def _in_channel_view(weight: Tensor, groups: int) -> Tensor:
    """``weight (out, in / groups, ...)`` -> ``(in, out / groups, prod(...))``: row ``i`` holds every weight
    that reads input channel ``i``."""
    out, per_group = weight.shape[0], weight.shape[1]
    if out % groups:
        raise LowbitError(
            f"weight {tuple(weight.shape)}: {out} output channels not divisible by groups={groups}"
        )
    w = weight.reshape(groups, out // groups, per_group, -1)
    return w.permute(0, 2, 1, 3).reshape(groups * per_group, out // groups, -1)


def output_ranges(weight: Tensor) -> Tensor:
    """``max |W|`` per output channel ``(out,)`` of ``weight (out, ...)``."""
    return weight.detach().reshape(weight.shape[0], -1).abs().amax(1)


def input_ranges(weight: Tensor, groups: int = 1) -> Tensor:
    """``max |W|`` per input channel ``(in,)`` of ``weight (out, in / groups, ...)`` (Linear: groups=1)."""
    w = _in_channel_view(weight.detach(), groups)
    return w.reshape(w.shape[0], -1).abs().amax(1)


def equalization_scales(r1: Tensor, r2: Tensor) -> Tensor:
    """``s = sqrt(r1 / r2)`` per channel (float64), 1 where either range is 0 (or not finite)."""
    r1, r2 = r1.double(), r2.double()
    if r1.shape != r2.shape:
        raise LowbitError(f"layer 1 has {r1.numel()} output channels but layer 2 reads {r2.numel()}")
    s = torch.sqrt(r1 / r2)
    ok = (r1 > 0) & (r2 > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s))


def scale_pair(
    w1: Tensor, b1: Tensor | None, w2: Tensor, s: Tensor, groups2: int = 1
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(W1 / s, b1 / s, W2 * s)``: output channel ``i`` of layer 1 and input channel ``i`` of layer 2
    (``groups2`` groups) scaled by ``1 / s_i`` and ``s_i``. Computed in float64, returned in each dtype."""
    s = s.double()
    new_w1 = w1.double() / s.reshape(-1, *([1] * (w1.dim() - 1)))
    new_b1 = None if b1 is None else (b1.double() / s).to(b1.dtype)
    return new_w1.to(w1.dtype), new_b1, scale_inputs(w2.double(), s, groups2).to(w2.dtype)


def scale_inputs(weight: Tensor, s: Tensor, groups: int = 1) -> Tensor:
    """``weight (out, in / groups, ...)`` with every entry that reads input channel ``i`` times ``s[i]``
    (``s (in,)``), in ``weight``'s dtype (``s`` cast to it)."""
    view = _in_channel_view(weight, groups) * s.to(weight.dtype).reshape(-1, 1, 1)
    per_group = weight.shape[1]
    out = view.reshape(groups, per_group, weight.shape[0] // groups, -1).permute(0, 2, 1, 3)
    return out.reshape(weight.shape)


def equalize_pair(
    w1: Tensor, b1: Tensor | None, w2: Tensor, groups2: int = 1
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One equalization step: ``(W1', b1', W2', s)`` with ``s = equalization_scales`` of the two layers.

    ``w1 (c, ...)``: layer 1's weight (any groups); ``b1 (c,)`` or None; ``w2 (out, c / groups2, ...)``.
    """
    s = equalization_scales(output_ranges(w1), input_ranges(w2, groups2))
    return (*scale_pair(w1, b1, w2, s, groups2), s)


def stretch_scales(peak: Tensor, limit: float = 6.0, headroom: float = 1.5, cap: float = 16.0) -> Tensor:
    """Factors ``s = clamp(limit / (headroom * peak), 1, cap)`` (float64) per channel of a clipped activation.

    ``peak (c,)``: each channel's largest value of ``min(relu(x), limit)`` on calibration data. Scaling
    channel ``i`` of the layer before by ``s_i`` and the reader of that channel by ``1 / s_i`` keeps the
    float model wherever the activation stays below ``headroom * peak_i`` (the clip moves from ``limit``
    to ``limit / s_i >= headroom * peak_i`` in the old units), and spreads a quiet channel over more of a
    per-tensor quantization grid. Channels with a zero (dead) or non-finite peak keep ``s = 1``.
    """
    if headroom < 1 or cap < 1:
        raise LowbitError(f"stretch needs headroom >= 1 and cap >= 1, got {headroom} and {cap}")
    p = peak.double()
    s = (limit / (headroom * p)).clamp(1.0, cap)
    return torch.where((p > 0) & torch.isfinite(p), s, torch.ones_like(s))
