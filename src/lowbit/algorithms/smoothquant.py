"""SmoothQuant (Xiao et al. 2022): per-input-channel scales that move activation outliers into weights.

For Linears ``W_i (out_i, in)`` that share one input ``x (..., in)`` and a scale ``s (in,)``::

    x' = x / s          (folded into what produces x: a norm's weight/bias, or a linear's output rows)
    W_i' = W_i * s      (each column j times s_j)
    x' @ W_i'.T == x @ W_i.T                                   exact in real arithmetic

    s_j = max|x_j| ** alpha / max_i max_r |W_i[r, j]| ** (1 - alpha)

``alpha`` in [0, 1] sets how much of the activation range moves into the weights (0.5 in the paper;
larger for models with stronger outliers). Channels whose calibrated activation or weight column is all
zero get ``s_j = 1``. Everything here is a pure function of tensors; finding the norm/linear that feeds
a group of Linears is the caller's job (``lowbit.transforms``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.primitives import check_finite, fake_quantize
from lowbit.core.spec import QuantSpec

Tensor = torch.Tensor
QuantError = Callable[[Tensor, Sequence[Tensor]], float]
ALPHAS = tuple(i / 20 for i in range(21))  # 0.0, 0.05, ..., 1.0


def _check_weights(weights: Sequence[Tensor], n: int) -> None:
    if len(weights) == 0:
        raise LowbitError("smoothing needs at least one weight sharing the input")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != n:
            raise LowbitError(f"weights[{i}] has shape {tuple(w.shape)}; expected (out, {n})")
        check_finite(w, f"weights[{i}]")


def _check_scales(s: Tensor, n: int, what: str) -> None:
    if tuple(s.shape) != (n,):
        raise LowbitError(f"scales shape {tuple(s.shape)} != ({n},) of {what}")
    check_finite(s, "scales")
    if bool((s <= 0).any()):
        raise LowbitError(f"scales must be positive; {int((s <= 0).sum())} of {n} are not")


def smooth_scales(
    act_absmax: Tensor, weights: Sequence[Tensor], alpha: float = 0.5, *, min_scale: float = 1e-5
) -> Tensor:
    """Scales ``s (in,)`` float32 for input channels with calibrated max ``|x|`` ``act_absmax (in,)`` and
    the Linears ``weights [(out_i, in)]`` reading that input; ``s >= min_scale``."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"alpha must be in [0, 1], got {alpha}")
    if not min_scale > 0:
        raise LowbitError(f"min_scale must be positive, got {min_scale}")
    if act_absmax.dim() != 1:
        raise LowbitError(f"act_absmax must be 1-d (in,), got shape {tuple(act_absmax.shape)}")
    n = act_absmax.shape[0]
    check_finite(act_absmax, "act_absmax")
    if bool((act_absmax < 0).any()):
        raise LowbitError("act_absmax holds negative values; pass max |x| per channel")
    _check_weights(weights, n)
    a = act_absmax.double()
    w = torch.stack([wi.detach().double().abs().amax(0) for wi in weights]).amax(0)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a == 0) | (w == 0), 1.0, s)
    return s.clamp(min=min_scale).float()


def scale_columns(weight: Tensor, s: Tensor) -> Tensor:
    """``W * s`` over columns: ``weight (out, in)``, ``s (in,)``; float64 math, ``weight.dtype`` out."""
    _check_scales(s, weight.shape[-1], f"weight {tuple(weight.shape)}")
    return (weight.double() * s.double()).to(weight.dtype)


def fold_into_norm(weight: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """A norm's affine ``weight (in,)`` and ``bias (in,)`` or None divided by ``s``: the norm then
    outputs ``x / s``. float64 math, results in the inputs' dtypes."""
    _check_scales(s, weight.shape[0], f"norm weight {tuple(weight.shape)}")
    if weight.dim() != 1 or (bias is not None and bias.shape != weight.shape):
        shapes = f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        raise LowbitError(f"norm parameters must be 1-d and alike: {shapes}")
    inv = 1.0 / s.double()
    b = None if bias is None else (bias.double() * inv).to(bias.dtype)
    return (weight.double() * inv).to(weight.dtype), b


def fold_into_linear_rows(weight: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """Output rows of the producing Linear, ``weight (in, k)`` and ``bias (in,)`` or None, divided by
    ``s (in,)``: it then outputs ``x / s``. float64 math, results in the inputs' dtypes."""
    _check_scales(s, weight.shape[0], f"producing weight {tuple(weight.shape)}")
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        shapes = f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        raise LowbitError(f"producing linear must be (in, k) with bias (in,): {shapes}")
    inv = 1.0 / s.double()
    b = None if bias is None else (bias.double() * inv).to(bias.dtype)
    return (weight.double() * inv[:, None]).to(weight.dtype), b


def fake_quant_error(act_spec: QuantSpec, weight_spec: QuantSpec) -> QuantError:
    """A ``quant_error`` for ``search_alpha``: the mean squared difference, summed over the weights,
    between ``x @ W.T`` and the same product with ``x`` and ``W`` fake-quantized to the two specs."""

    def error(x: Tensor, weights: Sequence[Tensor]) -> float:
        xq = fake_quantize(x.float(), act_spec, name="activation")
        total = 0.0
        for w in weights:
            ref = x.double() @ w.double().T
            out = xq.double() @ fake_quantize(w.float(), weight_spec, name="weight").double().T
            total += float((out - ref).pow(2).mean())
        return total

    return error


def search_alpha(
    x: Tensor,
    weights: Sequence[Tensor],
    quant_error: QuantError,
    alphas: Sequence[float] = ALPHAS,
    *,
    min_scale: float = 1e-5,
) -> tuple[float, Tensor]:
    """The ``alpha`` of ``alphas`` (first on ties) minimising ``quant_error(x / s, [W * s])`` on
    calibration activations ``x (..., in)``, and its scales ``s (in,)`` float32."""
    if len(alphas) == 0:
        raise LowbitError("search_alpha needs at least one alpha")
    check_finite(x, "x")
    n = weights[0].shape[-1] if len(weights) else -1
    if x.dim() == 0 or x.shape[-1] != n:
        raise LowbitError(f"x shape {tuple(x.shape)} does not end in the weights' {n} input channels")
    absmax = x.detach().abs().reshape(-1, n).amax(0)
    best: tuple[float, float, Tensor] | None = None
    for alpha in alphas:
        s = smooth_scales(absmax, weights, alpha, min_scale=min_scale)
        xs = (x.double() / s.double()).to(x.dtype)
        err = float(quant_error(xs, [scale_columns(w, s) for w in weights]))
        if not math.isfinite(err):
            raise NonFiniteError(f"quant_error returned {err} at alpha={alpha}")
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    return best[1], best[2]
