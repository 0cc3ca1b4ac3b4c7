"""``moving_average``: exponential moving average of the per-batch min and max.

As torch's ``MovingAverageMinMaxObserver``: the first batch sets ``lo``/``hi``; each later batch moves
them by ``averaging_constant`` toward its own min/max: ``lo += c * (batch_min - lo)``.
"""

from __future__ import annotations

from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.observers.base import Observer, Tensor, register_observer


@register_observer("moving_average")
class MovingAverageObserver(Observer):
    """EMA of per-batch min/max (float32, per tensor or per channel); one batch gives ``minmax``."""

    def __init__(self, spec: QuantSpec, *, name: str = "observer", averaging_constant: float = 0.01) -> None:
        super().__init__(spec, name=name)
        if not 0.0 < averaging_constant <= 1.0:
            raise LowbitError(
                f"observer {name!r}: averaging_constant must be in (0, 1], got {averaging_constant}"
            )
        self.averaging_constant = float(averaging_constant)
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def _observe(self, x3: Tensor, lo: Tensor, hi: Tensor) -> None:
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
            return
        c = self.averaging_constant
        self._lo = self._lo + c * (lo - self._lo)
        self._hi = self._hi + c * (hi - self._hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        assert self._lo is not None and self._hi is not None
        return self._lo, self._hi
