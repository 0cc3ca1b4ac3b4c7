"""``QuantSpec``: what to quantize to (format, symmetry, granularity, scale dtype, clipping).

Granularity is lowered to one ``block_size`` tuple: elements of one block share one scale/zero point.
For a tensor of shape ``(d0, ..., dn)``:

| granularity           | block_size                         | qparam shape (``scale.shape``)         |
|-----------------------|------------------------------------|----------------------------------------|
| PerTensor()           | ``(d0, ..., dn)``                  | ``(1, ..., 1)``                        |
| PerChannel(axis=a)    | ``1`` at ``a``, ``di`` elsewhere   | ``da`` at ``a``, ``1`` elsewhere       |
| PerGroup(g, axis=a)   | ``g`` at ``a``, ``1`` elsewhere    | ``ceil(da / g)`` at ``a``, ``di`` else |
| PerToken()            | ``(1, ..., 1, dn)``                | ``(d0, ..., d(n-1), 1)``               |

A weight ``(out, in)`` with ``PerGroup(128)`` has block ``(1, 128)`` and scales ``(out, ceil(in / 128))``.

Empty and 0-d tensors: a dimension of size 0 has 0 blocks where the block steps along it (the channel
axis, the group axis, the leading dims of PerToken) and 1 (empty) block where the block spans it, so the
table holds as written: PerTensor qparams of an ``(8, 0)`` tensor are ``(1, 1)``, PerChannel(0) ones
``(8, 1)``. A 0-d tensor is one block of one element under PerTensor and PerToken (qparams ``()``);
PerChannel and PerGroup need an axis and raise ``LowbitError`` on it.

Padding rule: a dimension that the block does not divide (SmolLM2's 576 with group 128) is padded at
its end to the next multiple; the last block is partial (576 = 4 x 128 + 64). Qparams of a partial
block are computed from its real elements only, and codes are kept for real elements only, so the
padding never reaches storage or results.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.formats import get_format


@dataclass(frozen=True)
class PerTensor:
    kind: str = field(default="per_tensor", init=False)


@dataclass(frozen=True)
class PerChannel:
    axis: int = 0
    kind: str = field(default="per_channel", init=False)


@dataclass(frozen=True)
class PerGroup:
    size: int = 128
    axis: int = -1
    kind: str = field(default="per_group", init=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise LowbitError(f"group size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class PerToken:
    kind: str = field(default="per_token", init=False)


Granularity = PerTensor | PerChannel | PerGroup | PerToken
_GRANULARITIES = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup,
                  "per_token": PerToken}  # fmt: skip
SCALE_DTYPES = ("float32", "float16", "bfloat16")


def block_size(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Block shape for ``shape`` under ``granularity`` (table in the module docstring)."""
    ndim = len(shape)
    if isinstance(granularity, PerTensor):
        return tuple(shape)
    if isinstance(granularity, PerToken):
        return (1,) * (ndim - 1) + (shape[-1],) if ndim else ()
    if ndim == 0 and isinstance(granularity, (PerChannel, PerGroup)):
        what = f"{type(granularity).__name__}(axis={granularity.axis})"
        raise LowbitError(f"{what} does not apply: a 0-d tensor has no axis; quantize it with PerTensor()")
    axis = _axis(granularity.axis, ndim)
    if isinstance(granularity, PerChannel):
        return tuple(1 if i == axis else s for i, s in enumerate(shape))
    if isinstance(granularity, PerGroup):
        return tuple(granularity.size if i == axis else 1 for i in range(ndim))
    raise LowbitError(f"unknown granularity {granularity!r}")


def qparam_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale/zero-point tensor: ``ceil(d / b)`` per dimension; 1 where an empty dimension
    is spanned by an empty block (``b == 0``, see the module docstring)."""
    return tuple(math.ceil(s / b) if b else 1 for s, b in zip(shape, block, strict=True))


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise LowbitError(f"axis {axis} out of range for a {ndim}-d tensor")
    return axis % ndim


@dataclass(frozen=True)
class QuantSpec:
    """What one tensor is quantized to.

    format: a name from ``lowbit.core.formats.FORMATS``.
    symmetric: zero point fixed (0 for signed, mid-range for unsigned) vs. fitted to min/max.
    granularity: PerTensor | PerChannel | PerGroup | PerToken.
    scale_dtype: dtype scales are stored (and applied) in: "float32", "float16" or "bfloat16".
    clip_ratio: fraction of the observed range kept, in (0, 1]; 1.0 = plain min/max.
    """

    format: str = "int8"
    symmetric: bool = True
    granularity: Granularity = PerTensor()
    scale_dtype: str = "float32"
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise LowbitError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if fmt.kind != "int" and not self.symmetric:
            raise LowbitError(f"format {fmt.name} is symmetric only (no zero point)")
        g = self.granularity
        if fmt.kind == "table" and not (
            isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis in (0, -2))
        ):
            raise LowbitError(
                f"format {fmt.name} holds one table per output channel (PerChannel(0)) or per tensor, not {g}"
            )

    @property
    def fmt(self):
        return get_format(self.format)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return block_size(tuple(shape), self.granularity)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        d = dict(d)
        g = dict(d.pop("granularity", {"kind": "per_tensor"}))
        kind = g.pop("kind", None)
        if kind not in _GRANULARITIES:
            raise LowbitError(f"unknown granularity kind {kind!r}; known: {', '.join(_GRANULARITIES)}")
        unknown = set(d) - {"format", "symmetric", "scale_dtype", "clip_ratio"}
        if unknown:
            raise LowbitError(f"unknown QuantSpec fields: {sorted(unknown)}")
        gcls = _GRANULARITIES[kind]
        unknown = set(g) - {f.name for f in fields(gcls) if f.init}
        if unknown:
            raise LowbitError(f"unknown {kind} fields: {sorted(unknown)}")
        return cls(granularity=gcls(**g), **d)
