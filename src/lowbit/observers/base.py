"""``Observer`` base class, the observer registry and ``make_observer``.

An observer watches one tensor (activation or weight) over calibration batches and turns what it saw
into a range ``[lo, hi]`` and qparams::

    obs = make_observer("kl", QuantSpec("uint8", symmetric=False), name="features.3.conv.0")
    for batch in calibration:
        obs.update(activation)          # any shape; shapes may change between calls
    scale, zero_point = obs.qparams()   # == qparams_from_range(*obs.range(), spec)

Granularity: ``PerTensor()`` gives ``lo``/``hi`` of shape ``()``; ``PerChannel(axis)`` gives ``(C,)``
with ``C = x.shape[axis]`` (the same in every batch). Ranges are float32 in the units of ``x``, on the
device of the first batch (histogram observers count on the CPU, from a subsample of large batches).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.core.primitives import qparams_from_range
from lowbit.core.spec import PerChannel, PerTensor, QuantSpec

Tensor = torch.Tensor
OBSERVERS: dict[str, type[Observer]] = {}
_O = TypeVar("_O", bound="type[Observer]")


def register_observer(kind: str) -> Callable[[_O], _O]:
    """Class decorator: make ``cls`` available to ``make_observer(kind, ...)``."""

    def add(cls: _O) -> _O:
        if kind in OBSERVERS:
            raise LowbitError(f"observer {kind!r} is already registered ({OBSERVERS[kind].__name__})")
        cls.kind = kind
        OBSERVERS[kind] = cls
        return cls

    return add


def make_observer(kind: str, spec: QuantSpec, /, name: str = "observer", **options: Any) -> Observer:
    """A new ``OBSERVERS[kind]`` for one tensor called ``name``; ``options`` are the class's keywords."""
    if kind not in OBSERVERS:
        raise LowbitError(f"unknown observer {kind!r}; known: {', '.join(sorted(OBSERVERS))}")
    cls = OBSERVERS[kind]
    allowed = cls.option_names()
    unknown = sorted(set(options) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no options"
        raise LowbitError(f"observer {kind!r} got unknown option(s) {unknown}; it takes: {takes}")
    return cls(spec, name=name, **options)


class Observer:
    """Calibration statistics of one tensor; subclasses implement ``_observe`` and ``_range``.

    ``update(x)`` reshapes ``x`` to ``(outer, C, inner)`` (``C = 1`` per tensor), checks it and hands
    ``_observe`` that view with the batch's float32 per-channel min and max ``(C,)``.
    """

    kind: ClassVar[str] = ""

    def __init__(self, spec: QuantSpec, *, name: str = "observer") -> None:
        if not isinstance(spec, QuantSpec):
            raise LowbitError(f"observer {name!r}: spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.name = name
        if not isinstance(spec.granularity, PerTensor | PerChannel):
            raise LowbitError(
                f"observer {name!r} ({self.kind}): granularity {spec.granularity} is not supported; "
                "use PerTensor() or PerChannel(axis)"
            )
        if spec.format == "binary":
            raise LowbitError(
                f"observer {name!r} ({self.kind}): format binary scales by mean |x|, not by a range"
            )
        self.batches = 0
        self.channels: int | None = None  # C, fixed by the first update
        self.device: torch.device | None = None  # of the first batch; range() and qparams() live there
        self._cache: tuple[Tensor, Tensor] | None = None

    @classmethod
    def option_names(cls) -> set[str]:
        """Keyword options ``make_observer`` accepts for this class."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "name"}

    def update(self, x: Tensor) -> None:
        """Observe one calibration batch ``x`` (float tensor, any shape)."""
        x3 = self._as_channels(x)
        lo, hi = _batch_range(x3)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            bad = int((~torch.isfinite(x3)).sum())
            raise NonFiniteError(f"observer {self.name!r}: {bad} of {x3.numel()} values are NaN or Inf")
        self._observe(x3, lo, hi)
        self.channels, self.device = x3.shape[1], self.device or x.device
        self.batches += 1
        self._cache = None

    def range(self) -> tuple[Tensor, Tensor]:
        """Calibrated ``(lo, hi)``, float32, shape ``()`` per tensor or ``(C,)`` per channel."""
        if self.batches == 0:
            raise LowbitError(f"observer {self.name!r} saw no data; was the calibration set empty?")
        if self._cache is None:
            lo, hi = self._range()
            shape = () if isinstance(self.spec.granularity, PerTensor) else (self.channels,)
            self._cache = (
                lo.float().reshape(shape).to(self.device),
                hi.float().reshape(shape).to(self.device),
            )
        return self._cache[0].clone(), self._cache[1].clone()

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """``qparams_from_range(*self.range(), spec)``: scale and zero point, shape as ``range()``."""
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, name={self.name!r}, batches={self.batches})"

    def _observe(self, x3: Tensor, lo: Tensor, hi: Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _as_channels(self, x: Tensor) -> Tensor:
        """``x`` as float32 ``(outer, C, inner)``; checks dtype, emptiness, axis and channel count."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise LowbitError(f"observer {self.name!r}: update() needs a float tensor, got {got}")
        if x.numel() == 0:
            raise LowbitError(
                f"observer {self.name!r}: update() got an empty tensor of shape {tuple(x.shape)}"
            )
        x = x.detach().float()
        g = self.spec.granularity
        if isinstance(g, PerTensor):
            c, outer, inner = 1, 1, x.numel()
        else:
            nd = x.dim()
            if not -nd <= g.axis < nd:
                raise LowbitError(
                    f"observer {self.name!r}: PerChannel axis {g.axis} is out of range for a tensor of "
                    f"shape {tuple(x.shape)}"
                )
            axis = g.axis % nd
            c = x.shape[axis]
            outer, inner = x.shape[:axis].numel(), x.shape[axis + 1 :].numel()
        if self.channels is not None and c != self.channels:
            raise LowbitError(
                f"observer {self.name!r}: {c} channels on axis {g.axis} (shape {tuple(x.shape)}), but "
                f"earlier batches had {self.channels}"
            )
        return x.reshape(outer, c, inner)


def _batch_range(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel min and max ``(C,)`` of ``(outer, C, inner)``; NaN propagates."""
    if x3.shape[1] == 1:
        lo, hi = torch.aminmax(x3)
        return lo.reshape(1), hi.reshape(1)
    return x3.amin(dim=(0, 2)), x3.amax(dim=(0, 2))
