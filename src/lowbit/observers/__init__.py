"""Calibration observers: ``make_observer(kind, spec, name=...)``, then ``update(x)`` per batch and
``range()`` / ``qparams()``. Kinds: ``minmax``, ``moving_average``, ``percentile``, ``kl``, ``mse``."""

from lowbit.observers.base import OBSERVERS, Observer, make_observer, register_observer
from lowbit.observers.histogram import Histogram, HistogramObserver
from lowbit.observers.kl import KLObserver
from lowbit.observers.minmax import MinMaxObserver
from lowbit.observers.moving_average import MovingAverageObserver
from lowbit.observers.mse import MSEObserver
from lowbit.observers.percentile import PercentileObserver

__all__ = [
    "OBSERVERS", "Histogram", "HistogramObserver", "KLObserver", "MSEObserver", "MinMaxObserver",
    "MovingAverageObserver", "Observer", "PercentileObserver", "make_observer", "register_observer",
]  # fmt: skip
