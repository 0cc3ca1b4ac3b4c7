"""AdaRound: learned up-or-down rounding of weights (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020).

For integer codes with fixed qparams ``(s, z)`` each weight rounds down or up::

    w' = s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)      # rectified sigmoid

``V`` starts where ``h(V)`` equals the fractional part of ``w / s`` (so the soft weight starts at the
float weight) and is trained to reduce an output reconstruction error, plus ``LAMBDA *
rounding_penalty(V, beta)``, which pushes every ``h`` to 0 or 1; ``beta`` anneals from 20 to 2 after a
warm-up without the penalty (``beta_at``). At the end ``h`` is replaced by ``V >= 0`` (``hard``).

``LearnedRounding`` holds one weight's ``V`` as an ``nn.Parameter``; ``codes()`` gives the final integer
codes for ``lowbit.core.primitives.dequantize`` with the same qparams.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.core.errors import LowbitError
from lowbit.core.primitives import check_finite
from lowbit.core.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid
LAMBDA = 0.01  # weight of the rounding penalty (summed over weights) against the reconstruction loss


def soft(v: Tensor) -> Tensor:
    """``h(V)`` in [0, 1], differentiable inside (0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard(v: Tensor) -> Tensor:
    """The final rounding decision: 1 (up) where ``V >= 0``, else 0 (down)."""
    return (v >= 0).to(v.dtype)


def init_logits(rest: Tensor) -> Tensor:
    """``V`` with ``soft(V) == rest`` for fractional parts ``rest`` in [0, 1)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def rounding_penalty(v: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1, largest at ``h = 0.5``."""
    return (1 - (2 * soft(v) - 1).abs().pow(beta)).sum()


def beta_at(
    step: int, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
) -> float | None:
    """Penalty exponent at ``step`` of ``steps``: None during the first ``warmup`` fraction (no
    penalty), then cosine-free linear decay from ``start`` to ``end``."""
    first = int(warmup * steps)
    if step < first:
        return None
    frac = (step - first) / max(1, steps - 1 - first)
    return end + (start - end) * max(0.0, 1.0 - frac)


class LearnedRounding(nn.Module):
    """Learned rounding of one weight ``(rows, cols)`` under fixed qparams.

    scale / zero_point: one per row ``(rows, 1)`` or per group ``(rows, cols // g)``; zero_point None
    for symmetric formats. ``forward()`` returns the soft (training) or hard (``self.hard_mode``)
    dequantized weight ``(rows, cols)`` in float32.
    """

    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, name: str):
        super().__init__()
        if spec.fmt.kind != "int":
            raise LowbitError(f"{name}: learned rounding needs an integer format, not {spec.format}")
        if weight.dim() != 2:
            raise LowbitError(
                f"{name}: learned rounding takes (rows, cols) weights, got {tuple(weight.shape)}"
            )
        check_finite(weight, name)
        self.spec, self.name = spec, name
        w = weight.detach().float()
        rows, cols = w.shape
        if scale.dim() != 2:
            raise LowbitError(f"{name}: scale must be (rows, groups), got {tuple(scale.shape)}")
        group = cols // scale.shape[1]
        if scale.shape[0] != rows or group * scale.shape[1] != cols:
            raise LowbitError(f"{name}: scale {tuple(scale.shape)} does not tile weight {tuple(w.shape)}")
        s = scale.detach().float().repeat_interleave(group, dim=1)
        z = (
            torch.zeros_like(s)
            if zero_point is None
            else zero_point.detach().float().repeat_interleave(group, 1)
        )
        v = w / s
        self.register_buffer("base", torch.floor(v))
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        self.register_buffer("nearest_up", v - self.base >= 0.5)
        self.v = nn.Parameter(init_logits(v - self.base))
        self.hard_mode = False

    def forward(self) -> Tensor:
        h = hard(self.v) if self.hard_mode else soft(self.v)
        fmt = self.spec.fmt
        return (torch.clamp(self.base + h + self.z, fmt.qmin, fmt.qmax) - self.z) * self.s

    @torch.no_grad()
    def reset(self) -> None:
        """Back to round-to-nearest (hard decisions equal to ``nearest_up``)."""
        self.v.copy_(torch.where(self.nearest_up, 1.0, -1.0))

    def penalty(self, beta: float) -> Tensor:
        return rounding_penalty(self.v, beta)

    def codes(self) -> Tensor:
        """Final integer codes ``(rows, cols)`` in the format's dtype."""
        fmt = self.spec.fmt
        q = torch.clamp(self.base + hard(self.v.detach()) + self.z, fmt.qmin, fmt.qmax)
        return q.to(fmt.torch_dtype)

    def flipped(self) -> float:
        """Fraction of weights now rounded the other way than round-to-nearest."""
        return float((hard(self.v.detach()).bool() != self.nearest_up).float().mean())
