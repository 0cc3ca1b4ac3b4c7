"""Exact packing of 1-8 bit unsigned codes into bytes, along the last dimension.

``pack(codes, bits)``: ``(..., n)`` uint8 codes in ``[0, 2**bits)`` -> ``(..., ceil(n * bits / 8))`` uint8.
``unpack(packed, bits, n)``: the inverse, bit-exact.

Layout: the codes of a row form one little-endian bit stream: code ``i`` occupies bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and stream bit ``k`` is bit ``k % 8``
of byte ``k // 8``. For 4 bits this puts element ``2j`` in the low nibble of byte ``j``; for 3 bits
8 codes fill 3 bytes. The tail of the last byte is zero.

Signed integer codes are packed as ``q - qmin`` (see ``to_unsigned``/``from_unsigned``).
Empty tensors pack to empty bytes of the same leading shape; 0-d codes (no last dimension) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.core.errors import LowbitError
from lowbit.core.formats import Format

Tensor = torch.Tensor


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take."""
    return (n * bits + 7) // 8


def to_unsigned(codes: Tensor, fmt: Format) -> Tensor:
    """Unsigned uint8 codes ``q - qmin`` for int formats; codebook indices as they are."""
    if fmt.kind == "int" and fmt.qmin != 0:
        return (codes.to(torch.int16) - fmt.qmin).to(torch.uint8)
    return codes.to(torch.uint8)


def from_unsigned(u: Tensor, fmt: Format) -> Tensor:
    """Inverse of ``to_unsigned``, in ``fmt.torch_dtype``."""
    if fmt.kind == "int" and fmt.qmin != 0:
        return (u.to(torch.int16) + fmt.qmin).to(fmt.torch_dtype)
    return u.to(fmt.torch_dtype)


def _check(t: Tensor, bits: int, what: str) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"can pack 1..8 bits, got {bits}")
    if t.dtype != torch.uint8:
        raise LowbitError(f"{what} expects uint8 {'codes' if what == 'pack' else 'bytes'}, got {t.dtype}")
    if t.dim() == 0:
        raise LowbitError(f"{what} works along the last dimension: got a 0-d tensor")


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``(..., n)`` into ``(..., packed_size(n, bits))`` bytes."""
    _check(codes, bits, "pack")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise LowbitError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.clone()
    lead, n = codes.shape[:-1], codes.shape[-1]
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        c = F.pad(codes, (0, (-n) % per)).reshape(*lead, packed_size(n, bits), per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return _or_reduce(c << shifts)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[..., None] >> shifts) & 1).reshape(*lead, n * bits)
    stream = F.pad(stream, (0, (-n * bits) % 8)).reshape(*lead, packed_size(n, bits), 8)
    return _or_reduce(stream << torch.arange(8, dtype=torch.uint8, device=codes.device))


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Unpack ``(..., packed_size(n, bits))`` bytes into ``(..., n)`` uint8 codes."""
    _check(packed, bits, "unpack")
    if packed.shape[-1] != packed_size(n, bits):
        raise LowbitError(
            f"packed last dim {packed.shape[-1]} != {packed_size(n, bits)} for {n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> shifts) & mask).reshape(*lead, nbytes * (8 // bits))[..., :n]
    shifts8 = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[..., None] >> shifts8) & 1).reshape(*lead, nbytes * 8)[..., : n * bits]
    stream = stream.reshape(*lead, n, bits)
    return _or_reduce(stream << torch.arange(bits, dtype=torch.uint8, device=packed.device))


def _or_reduce(x: Tensor) -> Tensor:
    """Bitwise OR over the last dimension (bits are disjoint, so a sum in uint8 never carries)."""
    return x.sum(-1, dtype=torch.uint8)
