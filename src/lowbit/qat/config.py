"""``QATConfig``: what quantization-aware training simulates and ``convert`` deploys.

| field                 | meaning                                                                       |
|-----------------------|-------------------------------------------------------------------------------|
| `weights`             | weight format: "int2".."int8" (symmetric), "ternary" (-1, 0, +1), "binary"    |
|                       | (-1, +1; one scale per channel, XNOR-Net style)                               |
| `group_size`          | None: one scale per output channel; else groups of that many inputs (weight-  |
|                       | only Linears: the integer ops take one weight scale per output channel)       |
| `activation_bits`     | 2..8: every quantized layer's input is fake-quantized per tensor; None: float |
|                       | activations (weight-only; Linear layers become ``QLinear``, convs stay float) |
| `activation_symmetric`| int<b> codes around 0 instead of uint<b> with a zero point                    |
| `weight_learning`     | "lsq": learned step size (LSQ, gradient scaled by 1/sqrt(n * qmax));          |
|                       | "fixed": the initial scales stay                                              |
| `activation_learning` | "lsq+": learned step and offset (zero point learned, rounded in the forward); |
|                       | "lsq": learned step, zero point fixed; "pact": learned clipping value         |
|                       | ``alpha`` (inputs clipped to [0, alpha], zero point 0); "fixed"               |
| `observer`            | activation observer that sets the initial ranges from calibration batches    |
|                       | (``lowbit.observers``; step 0 equals the post-training quantized model)       |
| `percentile`          | the kept percentile for observer "percentile"                                 |
| `weight_observer`     | "mse" (per-channel clipping search) or "minmax": the initial weight scales    |
| `fold_bn`             | Conv2d + BatchNorm2d pairs train with simulated folding (``QATConvBn2d``):    |
|                       | the weight is quantized after folding, so the deployed conv folds exactly     |
| `freeze_bn_after`     | training steps after which BatchNorm statistics freeze (None: never;          |
|                       | ``lowbit.qat.train`` counts steps)                                            |
| `bit_budget`          | learn each layer's weight bit width (``lowbit.qat.bits``) under this mean    |
|                       | (weighted by weight count, 2..8); ``weights`` gives the starting width        |
| `freeze_bits_after`   | step at which the widths become integers and stay (None: half the steps)      |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.core.errors import LowbitError
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec
from lowbit.nn.static import activation_spec
from lowbit.observers import OBSERVERS
from lowbit.transforms.configs import QuantConfig, register_config

WEIGHT_FORMATS = tuple(f"int{b}" for b in range(2, 9)) + ("ternary", "binary")
WEIGHT_LEARNING = ("lsq", "fixed")
ACTIVATION_LEARNING = ("lsq+", "lsq", "pact", "fixed")


@register_config
@dataclass(frozen=True)
class QATConfig(QuantConfig):
    """Quantization-aware training (``lowbit.qat.prepare`` / ``convert``): see the module docstring."""

    weights: str = "int4"
    group_size: int | None = None
    activation_bits: int | None = 8
    activation_symmetric: bool = False
    weight_learning: str = "lsq"
    activation_learning: str = "lsq+"
    observer: str = "percentile"
    percentile: float = 99.99
    weight_observer: str = "mse"
    fold_bn: bool = True
    freeze_bn_after: int | None = None
    bit_budget: float | None = None
    freeze_bits_after: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise LowbitError(
                f"QAT weights must be one of {', '.join(WEIGHT_FORMATS)} (1-8 bits), got {self.weights!r}"
            )
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise LowbitError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if self.activation_bits is not None:
            activation_spec(self.activation_bits, self.activation_symmetric)
            if self.group_size is not None:
                raise LowbitError(
                    "group-wise weights need float activations (activation_bits=None): the integer "
                    "layers take one weight scale per output channel"
                )
        if self.weight_learning not in WEIGHT_LEARNING:
            raise LowbitError(
                f"weight_learning must be one of {WEIGHT_LEARNING}, got {self.weight_learning!r}"
            )
        if self.activation_learning not in ACTIVATION_LEARNING:
            raise LowbitError(
                f"activation_learning must be one of {ACTIVATION_LEARNING}, got {self.activation_learning!r}"
            )
        if self.activation_learning == "pact" and self.activation_symmetric:
            raise LowbitError(
                "activation_learning='pact' clips to [0, alpha]: use activation_symmetric=False"
            )
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; known: {', '.join(sorted(OBSERVERS))}")
        if self.weight_observer not in ("mse", "minmax"):
            raise LowbitError(f"weight_observer must be 'mse' or 'minmax', got {self.weight_observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.bit_budget is not None:
            if not 2.0 <= self.bit_budget <= 8.0:
                raise LowbitError(f"bit_budget must be a mean of 2..8 bits, got {self.bit_budget}")
            if not self.weights.startswith("int") or self.weight_learning != "lsq":
                raise LowbitError("learned bit widths need int<b> weights and weight_learning='lsq'")
        if self.freeze_bits_after is not None and self.freeze_bits_after < 0:
            raise LowbitError(f"freeze_bits_after must be >= 0 or None, got {self.freeze_bits_after}")
        if self.freeze_bn_after is not None and self.freeze_bn_after < 0:
            raise LowbitError(f"freeze_bn_after must be >= 0 or None, got {self.freeze_bn_after}")

    @property
    def needs_calib(self) -> bool:
        return True

    def weight_spec(self) -> QuantSpec:
        """Spec of the deployed weights (float32 scales, symmetric)."""
        gran = PerGroup(self.group_size) if self.group_size else PerChannel(0)
        return QuantSpec(self.weights, True, gran, "float32")

    def activation_spec(self) -> QuantSpec | None:
        if self.activation_bits is None:
            return None
        return activation_spec(self.activation_bits, self.activation_symmetric)


_SCHEME = re.compile(r"w(?P<w>[1-8]|t)(?:g(?P<group>\d+))?(?:a(?P<act>\d))?")


def parse_qat_scheme(scheme: str) -> QATConfig:
    """``QATConfig`` of a CLI scheme ``w<W>[g<group>][a<A>]``: ``W`` 2..8 (int, symmetric), ``1`` (binary)
    or ``t`` (ternary); ``A`` 1..8 activation bits (uint with a zero point); no ``a``: weight-only.
    ``w8a8-static`` reads as ``w8a8``. Examples: ``w4a4``, ``wta8``, ``w1a8``, ``w2a2``, ``w4g32``."""
    text = scheme.strip().lower().removesuffix("-static")
    m = _SCHEME.fullmatch(text)
    if not m:
        raise LowbitError(
            f"unknown QAT scheme {scheme!r}; expected w<bits>[g<group>][a<bits>] with weight bits 1..8 "
            "(1: binary) or t (ternary), e.g. w4a4, wta8, w1a8, w4g32"
        )
    weights = {"1": "binary", "t": "ternary"}.get(m["w"], f"int{m['w']}")
    act = int(m["act"]) if m["act"] else None
    if act is not None and not 1 <= act <= 8:
        raise LowbitError(f"scheme {scheme!r}: activation bits must be 1..8")
    group = int(m["group"]) if m["group"] else None
    return QATConfig(weights=weights, group_size=group, activation_bits=act)
