"""Bias correction (Nagel et al. 2019, "Data-free quantization", sec. 4.2), empirical-mean form.

Quantizing a layer's weight ``W`` to ``W_q`` shifts its expected output by ``E[(W_q - W) x]``. With the
mean input ``mu = E[x]`` per input channel (measured on calibration data), the shift is removed by

    b' = b - (W_q - W) @ mu                      (Linear; Conv2d with groups = 1: kernel taps summed)

For a grouped / depthwise Conv2d each output channel sees only its group's input channels. Zero padding
at image borders is ignored (the mean is taken over all positions): the correction is exact for Linear
and for convs away from borders.
"""

from __future__ import annotations

import torch

from lowbit.core.errors import LowbitError

Tensor = torch.Tensor


def bias_shift(weight_error: Tensor, input_mean: Tensor, groups: int = 1) -> Tensor:
    """Expected output shift ``(out,)`` float32 of ``weight_error = W_q - W``.

    ``weight_error``: (out, in) for Linear or (out, in / groups, kh, kw) for Conv2d; ``input_mean``: (in,).
    Subtract the result from the layer's bias.
    """
    err = weight_error.double()
    if err.dim() == 4:
        err = err.sum(dim=(2, 3))
    if err.dim() != 2:
        raise LowbitError(
            f"weight error must be 2-d (Linear) or 4-d (Conv2d), got {tuple(weight_error.shape)}"
        )
    out, per_group = err.shape
    if out % groups or per_group * groups != input_mean.numel():
        raise LowbitError(
            f"weight {tuple(weight_error.shape)} with groups={groups} does not read {input_mean.numel()} "
            "input channels"
        )
    mu = input_mean.double().reshape(groups, 1, per_group)
    shift = (err.reshape(groups, out // groups, per_group) * mu).sum(-1)
    return shift.reshape(out).float()


class ChannelMean:
    """Running mean per channel of activations: dim 1 of 4-d (N, C, H, W), the last dim otherwise."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        rows = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
        s = rows.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += rows.shape[0]

    def mean(self) -> Tensor:
        if self.total is None or self.count == 0:
            raise LowbitError("no activations observed: cannot compute a channel mean")
        return (self.total / self.count).float()
