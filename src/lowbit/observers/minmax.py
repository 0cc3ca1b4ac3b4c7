"""``minmax``: the running min and max of everything observed (per tensor or per channel)."""

from __future__ import annotations

import torch

from lowbit.core.spec import QuantSpec
from lowbit.observers.base import Observer, Tensor, register_observer


@register_observer("minmax")
class MinMaxObserver(Observer):
    """``lo``/``hi`` = min/max over all batches: after one ``update(x)``, ``qparams()`` equals
    ``choose_qparams(x, spec)`` bit for bit (reshaped to ``()`` or ``(C,)``)."""

    def __init__(self, spec: QuantSpec, *, name: str = "observer") -> None:
        super().__init__(spec, name=name)
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def _observe(self, x3: Tensor, lo: Tensor, hi: Tensor) -> None:
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)

    def _range(self) -> tuple[Tensor, Tensor]:
        assert self._lo is not None and self._hi is not None
        return self._lo, self._hi
