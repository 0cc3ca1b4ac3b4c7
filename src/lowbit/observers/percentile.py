"""``percentile``: ``lo``/``hi`` at the ``(100 - p)``-th and ``p``-th percentiles of the observed values.

Percentiles are read from the per-channel histogram (``lowbit.observers.histogram``) with mass uniform
inside a bin, then clamped to the exact observed min/max: ``percentile=100`` gives exactly ``minmax``.
For a symmetric spec the qparams use ``max(|lo|, |hi|)`` as usual.
"""

from __future__ import annotations

from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.observers.base import Tensor, register_observer
from lowbit.observers.histogram import BINS, HistogramObserver


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """``percentile`` in [50, 100] (default 99.99); ``bins`` as ``HistogramObserver``."""

    def __init__(
        self, spec: QuantSpec, *, name: str = "observer", percentile: float = 99.99, bins: int = BINS
    ) -> None:
        super().__init__(spec, name=name, bins=bins)
        if not 50.0 <= percentile <= 100.0:
            raise LowbitError(f"observer {name!r}: percentile must be in [50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _range(self) -> tuple[Tensor, Tensor]:
        hist, lo, hi = self._seen()
        p = self.percentile / 100.0
        qlo = hist.quantile(1.0 - p).float()
        qhi = hist.quantile(p).float()
        return qlo.clamp(min=lo, max=hi), qhi.clamp(min=lo, max=hi)
