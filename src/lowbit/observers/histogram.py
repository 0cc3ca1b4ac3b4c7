"""Per-channel value histograms that grow without keeping samples, and their observer base class.

Channel ``c`` has ``bins`` equal bins from ``start[c]`` of width ``width[c]`` (float64, units of ``x``).
The first batch spans its own ``[min, max]``. A later batch outside the covered range grows it by
*exact* rebinning: the new width is an integer multiple ``k`` of the old one and the new start lies a
whole number ``j`` of old bins lower, so old bin ``t`` falls entirely into new bin ``(j + t) // k`` (no
mass is smeared). A channel that has seen one value only has width 0 (its mass sits in bin 0).

Counting is subsampled for speed: a batch of ``n > SAMPLES`` values counts runs of ``RUN`` consecutive
values (one 64-byte cache line), one run every ``s * RUN`` values, ``s ~ n / SAMPLES`` coprime with every
dimension (no row, column or channel is skipped systematically), each with weight ``s``; plus the
batch's exact per-channel min and max with weight 1, so the extremes are never lost. Per-tensor
counting uses ``torch.histc``, per-channel counting ``index_add_`` on float64.
"""

from __future__ import annotations

import math

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.observers.base import Observer, Tensor

SAMPLES = 1 << 19  # values counted per batch at most (plus the extremes)
RUN = 16  # consecutive values per sampled run
BINS = 2048  # default bins per channel, as TensorRT


class Histogram:
    """``counts (C, bins)`` float64 over ``[start, start + bins * width]`` per channel."""

    def __init__(self, channels: int, bins: int) -> None:
        self.bins = bins
        self.counts = torch.zeros(channels, bins, dtype=torch.float64)
        self.start = torch.zeros(channels, dtype=torch.float64)
        self.width = torch.zeros(channels, dtype=torch.float64)
        self.empty = True

    def add(self, x3: Tensor, lo: Tensor, hi: Tensor) -> None:
        """Count ``x3 (outer, C, inner)`` whose per-channel min/max are ``lo``/``hi`` ``(C,)``.

        Counting happens on the CPU (the subsample moves there; at most ``SAMPLES`` values).
        """
        lo, hi = lo.cpu(), hi.cpu()
        lo64, hi64 = lo.double(), hi.double()
        if self.empty:
            self.start, self.width, self.empty = lo64.clone(), (hi64 - lo64) / self.bins, False
        else:
            self._grow(lo64, hi64)
        nch, inner = x3.shape[1], x3.shape[2]
        flat = x3.reshape(-1)
        stride = _stride(tuple(x3.shape))
        channels = None
        if stride == 1:
            v = x3
            if nch > 1:
                channels = torch.arange(nch)[None, :, None]  # broadcasts over (outer, C, inner)
        else:
            runs = flat.numel() // (stride * RUN)
            v = flat[: runs * stride * RUN].view(runs, stride * RUN)[:, :RUN]
            if nch > 1:
                pos = torch.arange(runs)[:, None] * (stride * RUN) + torch.arange(RUN)
                channels = (pos // inner) % nch
        self._count(v.contiguous().cpu(), channels, float(stride))
        if stride > 1:
            self._count(torch.cat([lo, hi]), torch.arange(nch).repeat(2) if nch > 1 else None, 1.0)

    def quantile(self, q: float) -> Tensor:
        """Per-channel value ``(C,)`` below which a fraction ``q`` in [0, 1] of the mass lies.

        Mass is taken as uniform inside a bin; ``q = 0`` (``1``) gives the lower (upper) edge of the first
        (last) non-empty bin.
        """
        cdf = self.counts.cumsum(1)
        total = cdf[:, -1:]
        target = (q * total).clamp(min=total * 1e-12, max=total)
        j = torch.searchsorted(cdf, target).clamp(max=self.bins - 1)
        below = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), 0.0)
        inside = self.counts.gather(1, j)
        frac = ((target - below) / torch.where(inside > 0, inside, 1.0)).clamp(0.0, 1.0)
        return self.start + self.width * (j + frac).squeeze(1)

    def _grow(self, lo: Tensor, hi: Tensor) -> None:
        bins, start, width = self.bins, self.start, self.width
        top = start + bins * width
        need = (lo < start) | (hi > top)
        if not bool(need.any()):
            return
        t = torch.arange(bins, dtype=torch.float64)
        point = width == 0
        w = torch.where(point, 1.0, width)
        j = torch.ceil(((start - lo) / w).clamp(min=0.0))
        new_start = start - j * w
        k = torch.ceil((torch.maximum(hi, top) - new_start) / (bins * w)).clamp(min=1.0)
        idx = torch.floor((j[:, None] + t) / k[:, None])
        # a point mass (width 0) starts a fresh range over [min, max] and lands in the bin holding it
        p_start = torch.minimum(lo, start)
        p_width = (torch.maximum(hi, start) - p_start) / bins
        p_idx = torch.floor((start - p_start) / torch.where(p_width > 0, p_width, 1.0))
        idx = torch.where(point[:, None], p_idx[:, None], idx)
        idx = torch.where(need[:, None], idx, t).clamp(0, bins - 1).long()
        self.start = torch.where(need, torch.where(point, p_start, new_start), start)
        self.width = torch.where(need, torch.where(point, p_width, k * width), width)
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, idx, self.counts)

    def _count(self, v: Tensor, channels: Tensor | None, weight: float) -> None:
        """Add ``weight`` per value of ``v`` (CPU) to the bins of its channel: ``channels`` broadcasts
        against ``v`` (``None``: channel 0)."""
        nch, bins = self.counts.shape
        if nch == 1 and self._histc_ok():
            # float32 edges rounded outward still hold every value: growth made start <= lo, top >= hi
            lo32, hi32 = _f32_down(float(self.start)), _f32_up(float(self.start + bins * self.width))
            self.counts[0] += weight * torch.histc(v.reshape(-1), bins, lo32, hi32).double()
            return
        if channels is None:
            channels = torch.zeros((), dtype=torch.long)
        w = torch.where(self.width > 0, self.width, 1.0)
        idx = ((v.double() - self.start[channels]) / w[channels]).clamp_(0, bins - 1).long()  # floor
        idx = (idx + channels * bins).reshape(-1)
        self.counts.view(-1).index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64), alpha=weight)

    def _histc_ok(self) -> bool:
        """One channel whose bins float32 ``histc`` resolves (edges finite, bins many ulps wide)."""
        start, top = float(self.start), float(self.start + self.bins * self.width)
        return 1e-30 < top - start and max(abs(start), abs(top)) < min(1e38, 1e3 * (top - start))


def _f32_down(v: float) -> float:
    f = float(torch.tensor(v, dtype=torch.float32))
    return f if f <= v else float(torch.nextafter(torch.tensor(f), torch.tensor(-math.inf)))


def _f32_up(v: float) -> float:
    f = float(torch.tensor(v, dtype=torch.float32))
    return f if f >= v else float(torch.nextafter(torch.tensor(f), torch.tensor(math.inf)))


def _stride(shape: tuple[int, ...]) -> int:
    """1 for small tensors, else the smallest ``s >= numel / SAMPLES`` coprime with every dimension."""
    n = math.prod(shape)
    if n <= SAMPLES:
        return 1
    s = -(-n // SAMPLES)
    while any(d > 1 and math.gcd(s, d) > 1 for d in shape):
        s += 1
    return s


class HistogramObserver(Observer):
    """Base of ``percentile``, ``kl`` and ``mse``: exact min/max plus a ``Histogram`` per channel.

    ``bins``: histogram bins per channel (default 2048, as TensorRT).
    """

    def __init__(self, spec: QuantSpec, *, name: str = "observer", bins: int = BINS) -> None:
        super().__init__(spec, name=name)
        if not isinstance(bins, int) or not 16 <= bins <= 1 << 16:
            raise LowbitError(f"observer {name!r}: bins must be an int in [16, 65536], got {bins!r}")
        self.bins = bins
        self.hist: Histogram | None = None
        self.lo: Tensor | None = None  # exact per-channel min (C,) float32, on the CPU
        self.hi: Tensor | None = None

    def _observe(self, x3: Tensor, lo: Tensor, hi: Tensor) -> None:
        lo, hi = lo.cpu(), hi.cpu()
        if self.hist is None or self.lo is None or self.hi is None:
            self.hist = Histogram(x3.shape[1], self.bins)
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.hist.add(x3, lo, hi)

    def _seen(self) -> tuple[Histogram, Tensor, Tensor]:
        assert self.hist is not None and self.lo is not None and self.hi is not None
        return self.hist, self.lo, self.hi
