"""Numeric core: formats, QuantSpec and granularity, the primitive set, packing."""

from lowbit.core.errors import CheckpointError, FormatVersionError, LowbitError, NonFiniteError
from lowbit.core.formats import FORMATS, Format, get_format
from lowbit.core.packing import from_unsigned, pack, packed_size, to_unsigned, unpack
from lowbit.core.primitives import choose_qparams, dequantize, fake_quantize, qparams_from_range, quantize
from lowbit.core.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, block_size

__all__ = [
    "FORMATS", "CheckpointError", "Format", "FormatVersionError", "LowbitError", "NonFiniteError",
    "PerChannel", "PerGroup", "PerTensor", "PerToken", "QuantSpec", "block_size", "choose_qparams",
    "dequantize", "fake_quantize", "from_unsigned", "get_format", "pack", "packed_size", "qparams_from_range",
    "quantize", "to_unsigned", "unpack",
]  # fmt: skip
