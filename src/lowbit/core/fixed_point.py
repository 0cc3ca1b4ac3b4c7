"""Fixed-point requantization: int32 accumulators to 8-bit codes with no float arithmetic.

A real multiplier ``M = s_x * s_w / s_y`` (one per output channel) is stored as an int32 mantissa
``m0`` in ``[2**30, 2**31)`` and a right shift ``t``, so ``M ~= m0 * 2**-t`` (relative error < 2**-31).
Requantization of an accumulator ``acc`` (int32 range) is then::

    y = clamp(((acc * m0 + 2**(t - 1)) >> t) + zero_point, qmin, qmax)      # int64 arithmetic

that is ``floor(acc * M + 1/2)``: round half up (towards +inf). ONNX Runtime's QLinearConv and
QLinearMatMul compute ``round_half_even(float32(acc) * float32(M))`` instead, so the two agree except
where ``acc * M`` lies within float32 rounding of a half-integer: there they differ by one code
(tests/core/test_fixed_point.py measures how often).
"""

from __future__ import annotations

import torch

from lowbit.core.errors import LowbitError

Tensor = torch.Tensor
MANTISSA_BITS = 31


def quantize_multiplier(multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """``(m0, t)`` int64 tensors (shape of ``multiplier``) with ``multiplier ~= m0 * 2**-t``.

    ``multiplier``: positive finite reals (float64 recommended) below ``2**30``. ``m0`` lies in
    ``[2**30, 2**31)``; ``t`` in ``[1, 62]`` (multipliers below ``2**-31`` are flushed to the smallest
    representable one, as they map every int32 accumulator to 0 or +-1 anyway).
    """
    m = multiplier.double()
    if not bool(torch.isfinite(m).all()) or bool((m <= 0).any()):
        raise LowbitError("requantization multipliers must be positive and finite")
    if bool((m >= 2.0**30).any()):
        raise LowbitError(f"requantization multiplier {float(m.max()):.3g} too large (>= 2**30)")
    mant, exp = torch.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    m0 = torch.round(mant * 2.0**MANTISSA_BITS).long()
    carry = m0 == 2**MANTISSA_BITS  # mantissa rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    t = MANTISSA_BITS - exp.long() - carry.long()
    small = t > 62
    m0 = torch.where(small, torch.full_like(m0, 2**30), m0)
    t = torch.where(small, torch.full_like(t, 62), t)
    return m0, t


def requantize(acc: Tensor, m0: Tensor, t: Tensor, zero_point: Tensor | int, qmin: int, qmax: int) -> Tensor:
    """Codes ``clamp(floor(acc * m0 * 2**-t + 1/2) + zero_point, qmin, qmax)`` as int64, shape of ``acc``.

    ``acc``: integer accumulators (int64, within int32 range); ``m0``/``t``: from ``quantize_multiplier``,
    broadcastable to ``acc`` (per-channel: shaped to the channel axis); ``zero_point``: output zero point.
    """
    if acc.is_floating_point():
        raise LowbitError("requantize takes integer accumulators")
    acc = acc.long().clamp(-(2**31), 2**31 - 1)
    rounding = torch.ones_like(t) << (t - 1)
    y = (acc * m0 + rounding) >> t
    zp = zero_point.long() if isinstance(zero_point, Tensor) else int(zero_point)
    return (y + zp).clamp(qmin, qmax)
