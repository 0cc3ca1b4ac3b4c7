"""Codes <-> stored bytes for any format: the one place that knows how a code tensor is laid out on disk.

``encode(codes, fmt)``: codes ``(..., n)`` (``fmt.torch_dtype``) -> uint8 ``(..., stored_bytes(n, fmt))``.
``decode(data, fmt, n)``: the inverse, bit-exact. Sub-byte int and codebook codes are bit-packed along the
last dimension (``lowbit.core.packing``); 8-bit int codes are their own byte (two's complement for int8,
so ``data.view(torch.int8)`` is the codes, zero-copy, as int8 matmul kernels want them); float codes are
their raw little-endian bytes.
"""

from __future__ import annotations

import torch

from lowbit.core.formats import Format
from lowbit.core.packing import from_unsigned, pack, packed_size, to_unsigned, unpack


def stored_bytes(n: int, fmt: Format) -> int:
    """Bytes that a row of ``n`` codes takes on disk."""
    if fmt.kind == "float":
        return n * fmt.bits // 8
    return packed_size(n, fmt.bits)


def encode(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Stored bytes of ``codes``: uint8 ``(..., stored_bytes(n, fmt))``."""
    if _raw_bytes(fmt):
        lead, n = codes.shape[:-1], codes.shape[-1]
        return codes.contiguous().view(torch.uint8).reshape(*lead, stored_bytes(n, fmt))
    return pack(to_unsigned(codes, fmt), fmt.bits)


def decode(data: torch.Tensor, fmt: Format, n: int) -> torch.Tensor:
    """Codes ``(..., n)`` in ``fmt.torch_dtype`` from stored bytes ``(..., stored_bytes(n, fmt))``."""
    if _raw_bytes(fmt):
        return data.contiguous().view(fmt.torch_dtype)
    return from_unsigned(unpack(data, fmt.bits, n), fmt)


def _raw_bytes(fmt: Format) -> bool:
    """Codes stored as their own bytes: float formats and 8-bit integers."""
    return fmt.kind == "float" or (fmt.kind == "int" and fmt.bits == 8)
