"""Number formats: integers of 1-8 bits, ternary, binary, fp16/bf16, fp8 (e4m3, e5m2), fp4 (e2m1), nf4, log2.

A ``Format`` says how a code is stored and what real value it stands for (before scaling):

| kind       | formats                          | code dtype      | value of code ``q``              |
|------------|----------------------------------|-----------------|----------------------------------|
| "int"      | int2..int8, uint1..uint8, ternary | int8 / uint8    | ``(q - zero_point) * scale``     |
| "float"    | fp16, bf16, fp8_e4m3, fp8_e5m2   | the float dtype | ``q * scale``                    |
| "codebook" | nf4, fp4_e2m1, log2, binary      | uint8 (index)   | ``levels[q] * scale``            |
| "table"    | lut2, lut3, lut4                 | uint8 (index)   | ``table[row, q] * scale[row]``   |

Table formats carry no fixed levels: each tensor (per output channel, or one for the tensor) has its own
``2**bits``-entry table of levels in [-1, 1] fitted to it (``lowbit.algorithms.kmeans``), stored beside
the codes. They live in ``TABLE_FORMATS``, not ``FORMATS``: the core primitives (``quantize``,
``choose_qparams``) have no table to work with and refuse them.

Sub-byte codes are packed by ``lowbit.core.packing`` as unsigned ``q - qmin`` (int) or the index (codebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.errors import LowbitError

# NF4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], exact zero included.
_NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# fp4 e2m1 (OCP MX / NVFP4 element): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, divided by 6 so the levels span
# [-1, 1] as every codebook's do (the scale is the block's absmax); 15 levels, the 16th code is unused.
_FP4_LEVELS = tuple(sorted({s * v / 6.0 for s in (-1.0, 1.0) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)}))

# log2: zero and +-2^-k for k = 0..6 (15 levels in 4 bits; the 16th code is unused).
_LOG2_LEVELS = tuple(sorted({0.0} | {s * 2.0**-k for s in (-1.0, 1.0) for k in range(7)}))


@dataclass(frozen=True)
class Format:
    """One number format. ``qmin``/``qmax`` bound integer codes; ``levels`` lists codebook values."""

    name: str
    kind: str  # "int" | "float" | "codebook"
    bits: int
    qmin: int = 0
    qmax: int = 0
    dtype_name: str = ""  # float kind: the torch dtype name
    levels: tuple[float, ...] = ()

    @property
    def signed(self) -> bool:
        return self.kind != "int" or self.qmin < 0

    @property
    def torch_dtype(self) -> torch.dtype:
        """dtype that holds one unpacked code."""
        if self.kind == "float":
            return getattr(torch, self.dtype_name)
        if self.kind == "int" and self.qmin < 0:
            return torch.int8
        return torch.uint8

    @property
    def float_max(self) -> float:
        """Largest finite value of a float format."""
        return float(torch.finfo(self.torch_dtype).max)

    @property
    def n_codes(self) -> int:
        """Number of distinct unsigned codes a packer must hold (2**bits)."""
        return 1 << self.bits


def _int(name: str, bits: int, signed: bool) -> Format:
    if signed:
        return Format(name, "int", bits, qmin=-(1 << (bits - 1)), qmax=(1 << (bits - 1)) - 1)
    return Format(name, "int", bits, qmin=0, qmax=(1 << bits) - 1)


FORMATS: dict[str, Format] = {}
for _b in range(2, 9):
    FORMATS[f"int{_b}"] = _int(f"int{_b}", _b, signed=True)
for _b in range(1, 9):
    FORMATS[f"uint{_b}"] = _int(f"uint{_b}", _b, signed=False)
FORMATS["ternary"] = Format("ternary", "int", 2, qmin=-1, qmax=1)
FORMATS["binary"] = Format("binary", "codebook", 1, levels=(-1.0, 1.0))
FORMATS["nf4"] = Format("nf4", "codebook", 4, levels=_NF4_LEVELS)
FORMATS["log2"] = Format("log2", "codebook", 4, levels=_LOG2_LEVELS)
FORMATS["fp4_e2m1"] = Format("fp4_e2m1", "codebook", 4, levels=_FP4_LEVELS)
FORMATS["fp16"] = Format("fp16", "float", 16, dtype_name="float16")
FORMATS["bf16"] = Format("bf16", "float", 16, dtype_name="bfloat16")
FORMATS["fp8_e4m3"] = Format("fp8_e4m3", "float", 8, dtype_name="float8_e4m3fn")
FORMATS["fp8_e5m2"] = Format("fp8_e5m2", "float", 8, dtype_name="float8_e5m2")


TABLE_FORMATS: dict[str, Format] = {f"lut{b}": Format(f"lut{b}", "table", b) for b in (2, 3, 4)}


def get_format(name: str | Format) -> Format:
    """Look a format up by name; an unknown name raises ``LowbitError`` listing the known ones."""
    if isinstance(name, Format):
        return name
    if name in TABLE_FORMATS:
        return TABLE_FORMATS[name]
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join([*FORMATS, *TABLE_FORMATS])
        raise LowbitError(f"unknown format {name!r}; known: {known}") from None
