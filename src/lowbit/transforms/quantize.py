"""``quantize_``: look the handler up by ``type(config)`` and let it swap modules in place."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.kernels.advice import Advice, apply_advice, load_cached
from lowbit.transforms.configs import QuantConfig

HANDLERS: dict[type[QuantConfig], Callable] = {}


def register_handler(config_type: type[QuantConfig]) -> Callable:
    """Decorator: ``fn(model, config, calib, selector, progress) -> QuantSummary`` handles ``config_type``."""

    def deco(fn: Callable) -> Callable:
        HANDLERS[config_type] = fn
        return fn

    return deco


@dataclass
class QuantSummary:
    """What ``quantize_`` did: fqn -> description of quantized modules; fqn -> reason for skipped ones."""

    config: QuantConfig
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    routed: int = 0  # layers given measured backend routes (``advice``)
    folded: dict[str, str] = field(default_factory=dict)  # BatchNorm fqn -> the conv it was folded into
    fused: dict[str, str] = field(default_factory=dict)  # activation fqn -> the layer whose range absorbs it
    equalized: list[tuple[str, str]] = field(default_factory=list)  # (layer, next layer) pairs equalized
    stretched: list[tuple[str, str]] = field(default_factory=list)  # (layer, depthwise conv) across a ReLU6
    float_ops: dict[str, int] = field(default_factory=dict)  # module type -> count of leaf modules left float

    def __str__(self) -> str:
        lines = [f"{type(self.config).__name__}: {len(self.quantized)} modules quantized"]
        if self.folded:
            lines.append(f"  folded: {len(self.folded)} BatchNorm layers into their convs")
        if self.equalized:
            lines.append(f"  equalized: {len(self.equalized)} consecutive layer pairs (cross-layer)")
        if self.stretched:
            lines.append(f"  stretched: {len(self.stretched)} ReLU6 outputs read by depthwise convs")
        if self.fused:
            lines.append(f"  fused: {len(self.fused)} ReLU/ReLU6 into the output range of the layer before")
        lines += [f"  tied: {a} shares {b}" for a, b in self.tied.items()]
        lines += [f"  kept float: {k} ({v})" for k, v in self.skipped.items()]
        if self.float_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in self.float_ops.items())
            lines.append(f"  float ops: {ops}; functional ops between layers (adds, attention matmuls) too")
        return "\n".join(lines)


class Selector:
    """Module-name filter. Patterns are globs (``*.mlp.*``) or regexes prefixed ``re:``.

    A name is selected when it matches some ``include`` pattern (all names if include is empty)
    and no ``exclude`` pattern.
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = [self._compile(p) for p in include]
        self.exclude = [self._compile(p) for p in exclude]

    @staticmethod
    def _compile(p: str) -> re.Pattern:
        try:
            return re.compile(p[3:] if p.startswith("re:") else fnmatch.translate(p))
        except re.error as e:
            raise LowbitError(f"bad module pattern {p!r}: {e}") from None

    def __call__(self, fqn: str) -> bool:
        inc = not self.include or any(p.fullmatch(fqn) for p in self.include)
        return inc and not any(p.fullmatch(fqn) for p in self.exclude)


def require_quantized(summary: QuantSummary) -> None:
    """Raise when ``summary`` lists no quantized layer."""
    if not summary.quantized:
        raise LowbitError("no quantizable layer matched (check the model and include/exclude patterns)")


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calib: Iterable | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = False,
    advice: Advice | bool | None = None,
) -> QuantSummary:
    """Quantize ``model`` in place as ``config`` says; returns what was quantized and what stayed float.

    ``calib``: calibration batches for methods that need them (ignored by round-to-nearest).
    ``include``/``exclude``: module-name patterns (see ``Selector``).
    ``advice``: an ``Advice`` (or True: this machine's cache, from ``lowbit advise``) whose measured
    routes pick each layer's backend by batch size (``lowbit.kernels.advice``).
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in HANDLERS)
        raise LowbitError(f"no handler for config {type(config).__name__}; known: {known}")
    summary = handler(model, config, calib, Selector(include, exclude), progress)
    require_quantized(summary)
    if advice:
        summary.routed = apply_advice(model, load_cached() if advice is True else advice)
    model.lowbit_config = config.to_dict()
    return summary
