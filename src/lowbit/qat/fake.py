"""Fake quantization for training: ``x -> dequantize(quantize(x))`` with straight-through gradients and
learnable qparams.

``FakeQuantizer`` learns its step size in the log domain, ``s = exp(log_scale)`` (Adam moves a parameter
by about the learning rate per step whatever its gradient, so a raw step size of 0.02 would reach zero in
a few dozen steps at lr 1e-3; in the log domain a step changes it by about 0.1%, and it stays positive),
plus, for asymmetric integer codes, a ``zero_point`` parameter kept as a float and rounded in the
forward. For integer formats::

    q  = clamp(round(x / s) + round(z), qmin, qmax)   # round: gradient 1 (straight-through estimator)
    x' = (q - round(z)) * s

so ``dx'/dx`` is 1 inside the range and 0 where ``q`` was clamped, and autograd gives LSQ's step-size
gradient (``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` outside; Esser et al. 2020), scaled
by ``1 / sqrt(n * qmax)`` (``n``: elements per scale) as the paper prescribes. Forward values equal
``lowbit.core.primitives.quantize`` / ``dequantize`` with the same qparams (same float32 ops), so a
converted model reproduces them.

Learning modes:

| mode    | learned               | forward                                                             |
|---------|-----------------------|---------------------------------------------------------------------|
| `lsq`   | scale                 | as above, zero point fixed                                          |
| `lsq+`  | scale and zero point  | as above (LSQ+, Bhalgat et al. 2020; the offset is ``-z * s``)      |
| `pact`  | clip ``alpha = s * qmax`` | ``y = clamp(x, 0, alpha)``, ``q = round(y / s)`` with ``s`` held  |
|         |                       | constant: ``dx'/dalpha = 1`` where ``x >= alpha`` (PACT, Choi 2018)   |
| `fixed` | nothing               | as above                                                            |
| `bits`  | scale and bit width   | symmetric weights with a learned bit width ``b`` (one per layer,     |
|         |                       | 2..8, real-valued): ``L = 2^(b-1) - 1`` levels each side,             |
|         |                       | ``x' = round(clamp(x, -s L, s L) / s) s``, differentiable in ``b``    |
|         |                       | through the clipping range (Uhlich et al. 2020); ``fix_bits(n)``      |
|         |                       | keeps the range ``s L``, rounds ``b`` to ``n`` and continues as       |
|         |                       | ``lsq`` on ``int{n}``                                               |

``binary`` (levels -1, +1): ``x' = s * sign(x / s)`` (``+1`` for ``x / s > 0``), gradient 1 for
``|x / s| <= 1`` (clipped straight-through), LSQ-style step gradient.

Weights go through ``FakeQuantizer`` as ``(rows, cols)``: one scale per row (per output channel), or
per group of ``group_size`` inputs (the rows are split into groups first).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.spec import QuantSpec

MODES = ("lsq", "lsq+", "pact", "fixed", "bits")
BIT_RANGE = (2.0, 8.0)  # "bits" mode
MIN_SCALE = 1e-12  # step sizes are floored here (x / s and its gradient x / s^2 stay finite)


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward (bit for bit: ``x + (y - y)``, ``y = x * g``), gradient multiplied by ``g``."""
    y = x * g
    return x.detach() + (y - y.detach())


class FakeQuantizer(nn.Module):
    """Fake-quantizes tensors to ``spec``'s format with ``scale`` of shape ``shape`` (``()`` per tensor,
    ``(rows, 1)`` per row of a 2-d input). ``spec`` gives the format and symmetry; its granularity is
    not used (the caller shapes the input). ``name`` labels errors.

    Uninitialised until ``set_qparams``: a forward before raises. While ``observer`` is set
    (``lowbit.qat.prepare`` calibrating), a forward feeds it and returns ``x`` unchanged.
    """

    def __init__(self, spec: QuantSpec, mode: str, shape: tuple[int, ...], name: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise LowbitError(f"{name}: unknown learning mode {mode!r}; known: {', '.join(MODES)}")
        fmt = spec.fmt
        if fmt.kind != "int" and fmt.name != "binary":
            raise LowbitError(
                f"{name}: fake quantization supports integer formats and binary, got {fmt.name}"
            )
        self.spec, self.mode, self.name = spec, mode, name
        self.qmin, self.qmax = (fmt.qmin, fmt.qmax) if fmt.kind == "int" else (-1, 1)
        self.log_scale = nn.Parameter(torch.zeros(shape), requires_grad=mode != "fixed")
        has_zp = fmt.kind == "int" and not spec.symmetric
        zp = nn.Parameter(torch.zeros(shape), requires_grad=mode == "lsq+") if has_zp else None
        self.zero_point = zp
        self.register_buffer("initialized", torch.tensor(False))
        self.observer = None
        if mode == "bits":
            if fmt.kind != "int" or not spec.symmetric:
                raise LowbitError(f"{name}: learned bit widths need symmetric int weights, got {fmt.name}")
            self.bit_width = nn.Parameter(torch.tensor(float(fmt.bits)))
            self.register_buffer("fixed_bits", torch.tensor(0))  # > 0 once fix_bits ran (survives a resume)
            self.register_load_state_dict_post_hook(lambda module, keys: module._restore_bits())

    def _restore_bits(self) -> None:
        if self.mode == "bits" and int(self.fixed_bits) > 0:
            self._apply_fixed()  # fixed before the checkpoint was written

    def bits(self) -> Tensor:
        """Bit width: learned (``bit_width`` in 2..8, differentiable) or the format's."""
        if self.mode != "bits":
            return torch.tensor(float(self.spec.fmt.bits))
        return self.bit_width.clamp(*BIT_RANGE)

    def levels(self) -> Tensor:
        """Levels on each side of zero of a "bits" quantizer, ``2^(b-1) - 1`` (real-valued)."""
        return torch.exp2(self.bits() - 1.0) - 1.0

    def fix_bits(self, bits: int) -> None:
        """End bit-width learning: ``int{bits}`` codes from now on, step sizes still learned (``lsq``)."""
        if not 2 <= bits <= 8:
            raise LowbitError(f"{self.name}: bit width must be 2..8, got {bits}")
        with torch.no_grad():
            self.log_scale.add_(torch.log(self.levels() / ((1 << (bits - 1)) - 1)))  # same range, new step
        self.fixed_bits.fill_(bits)
        self._apply_fixed()

    def _apply_fixed(self) -> None:
        bits = int(self.fixed_bits)
        self.spec = QuantSpec(f"int{bits}", True, self.spec.granularity, self.spec.scale_dtype)
        self.qmin, self.qmax, self.mode = self.spec.fmt.qmin, self.spec.fmt.qmax, "lsq"
        self.bit_width.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{self.spec.format}, {self.mode}, scale {tuple(self.log_scale.shape)}"

    @property
    def scale(self) -> Tensor:
        """The step size, ``exp(log_scale)`` (differentiable)."""
        return torch.exp(self.log_scale)

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor | None) -> None:
        """Initial qparams (``scale`` > 0, broadcastable to ``self.scale``; zero point in code units)."""
        tiny = torch.finfo(torch.float32).tiny
        self.log_scale.copy_(torch.log(scale.float().clamp_min(tiny)).reshape(self.log_scale.shape))
        if self.zero_point is not None:
            zp = zero_point if zero_point is not None else torch.zeros(())
            self.zero_point.copy_(zp.float().reshape(self.zero_point.shape).expand_as(self.zero_point))
        self.initialized.fill_(True)

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """Deployable ``(scale float32, zero point in the code dtype or None)``, as the forward uses them."""
        self.check_finite()
        scale = self.scale.detach().float().clamp_min(MIN_SCALE)
        if self.zero_point is None:
            return scale, None
        zp = torch.round(self.zero_point.detach()).clamp(self.qmin, self.qmax)
        return scale, zp.to(self.spec.fmt.torch_dtype)

    def check_finite(self) -> None:
        """``NonFiniteError`` naming this quantizer when a qparam is NaN, Inf or a scale is <= 0."""
        with torch.no_grad():
            for what, t in (("scale", self.scale), ("zero_point", self.zero_point)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"{self.name}: {what} became {float(t[~torch.isfinite(t)][0])}")
            if not bool((self.scale > 0).all()):
                raise NonFiniteError(f"{self.name}: scale became {float(self.scale.min()):.3g} (<= 0)")

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return x
        if not bool(self.initialized):
            raise LowbitError(f"{self.name}: fake quantizer used before its qparams were set")
        per_scale = max(1, x.numel() // max(1, self.log_scale.numel()))
        s = self.scale.clamp_min(MIN_SCALE)
        if self.mode != "fixed":
            s = grad_scale(s, 1.0 / math.sqrt(per_scale * max(1, self.qmax)))
        if self.spec.fmt.name == "binary":
            v = x / s
            clipped = v.clamp(-1.0, 1.0)
            sign = torch.where(v > 0, 1.0, -1.0).to(x.dtype)
            return (clipped + (sign - clipped).detach()) * s
        if self.mode == "bits":
            bound = s * self.levels()
            return round_ste(torch.maximum(torch.minimum(x, bound), -bound) / s) * s
        if self.mode == "pact":
            y = torch.minimum(torch.relu(x), s * self.qmax)
            s = s.detach()
            return torch.clamp(round_ste(y / s), self.qmin, self.qmax) * s
        z = 0.0
        if self.zero_point is not None:
            z = round_ste(self.zero_point.clamp(self.qmin, self.qmax))
        q = torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s


def weight_rows(weight: Tensor, group_size: int | None) -> Tensor:
    """``weight (out, ...)`` as the rows its scales apply to: ``(out, n)``, or ``(out * n / g, g)`` for
    groups of ``g`` inputs (``n`` must be a multiple of ``g``)."""
    rows = weight.reshape(weight.shape[0], -1)
    if not group_size:
        return rows
    if rows.shape[1] % group_size:
        raise LowbitError(f"{rows.shape[1]} inputs are not a multiple of group_size {group_size}")
    return rows.reshape(-1, group_size)
