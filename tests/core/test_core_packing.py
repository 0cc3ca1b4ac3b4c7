"""Sub-byte packing: exact round trips, the documented bit layout, and the error paths."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import (
    FORMATS,
    LowbitError,
    QuantSpec,
    choose_qparams,
    from_unsigned,
    pack,
    packed_size,
    quantize,
    to_unsigned,
    unpack,
)
from lowbit.core.codec import decode, encode, stored_bytes

BITS = list(range(1, 9))
LENGTHS = [1, 3, 5, 7, 13, 576, 1000]


def _codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


# --- exact -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_round_trip_exact(bits, n):
    codes = _codes((n,), bits, seed=bits * 1000 + n)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_size(n, bits),) == ((n * bits + 7) // 8,)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_round_trip_all_ones_and_zeros(bits):
    """Every bit set (no carries between codes) and every bit clear; odd length leaves a partial byte."""
    for fill in (0, (1 << bits) - 1):
        codes = torch.full((3, 13), fill, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), bits, 13), codes)


@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 1), (1, 576), (2, 0)], ids=str)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_round_trip_leading_dims(bits, shape):
    codes = _codes(shape, bits)
    packed = pack(codes, bits)
    assert packed.shape == (*shape[:-1], packed_size(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", [3, 4], ids=lambda b: f"{b}bit")
def test_rows_are_independent(bits):
    """Packing a matrix equals packing each row (rows never share a byte) and ignores strides."""
    codes = _codes((13, 5), bits).t()  # non-contiguous (5, 13)
    packed = pack(codes, bits)
    for r in range(codes.shape[0]):
        assert torch.equal(packed[r], pack(codes[r].contiguous(), bits))


# Golden layouts, computed by hand from the docstring: code i occupies stream bits [i*b, (i+1)*b), LSB
# first; stream bit k is bit k % 8 of byte k // 8; the tail of the last byte is zero.
GOLDEN = [
    # 1 bit: 1,0,1,1,0,0,0,0 -> 0b00001101; the ninth code alone in byte 1.
    ("1bit", 1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0x0D, 0x01]),
    # 2 bits: 3 | 0<<2 | 1<<4 | 2<<6 = 0x93.
    ("2bit", 2, [3, 0, 1, 2], [0x93]),
    # 4 bits: element 2j in the low nibble of byte j.
    ("4bit", 4, [0x1, 0x2, 0x3, 0x4, 0x5], [0x21, 0x43, 0x05]),
    # 3 bits, codes 0..7 -> 3 bytes:
    #   byte0 = c0 | c1<<3 | (c2&3)<<6        = 0 | 8 | 128       = 0x88
    #   byte1 = c2>>2 | c3<<1 | c4<<4 | (c5&1)<<7 = 0 | 6 | 64 | 128 = 0xC6
    #   byte2 = c5>>1 | c6<<2 | c7<<5          = 2 | 24 | 224      = 0xFA
    ("3bit", 3, [0, 1, 2, 3, 4, 5, 6, 7], [0x88, 0xC6, 0xFA]),
    # 3 bits, a lone 7 -> 0b00000111; two 7s -> 0b00111111.
    ("3bit-tail", 3, [7, 7], [0x3F]),
    # 5 bits: 31 fills bits 0-4, 1 starts at bit 5 -> byte0 = 31 | 1<<5 = 0x3F, byte1 = 0.
    ("5bit", 5, [31, 1], [0x3F, 0x00]),
    # 6 bits: 0x3F, 0x00, 0x3F, 0x2A = stream 0xABF03F -> bytes 0x3F, 0xF0, 0xAB
    ("6bit", 6, [0x3F, 0x00, 0x3F, 0x2A], [0x3F, 0xF0, 0xAB]),
    ("8bit", 8, [0, 255, 17], [0, 255, 17]),
]


@pytest.mark.parametrize(("bits", "codes", "expected"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_layout(bits, codes, expected):
    packed = pack(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.tolist() == expected
    assert unpack(torch.tensor(expected, dtype=torch.uint8), bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_golden_layout_matches_bit_stream(bits):
    """The packed bytes equal the little-endian bit stream built with Python integers."""
    codes = _codes((37,), bits, seed=7)
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes.tolist()))
    expected = list(stream.to_bytes(packed_size(37, bits), "little"))
    assert pack(codes, bits).tolist() == expected


INT_AND_CODEBOOK = [name for name, f in FORMATS.items() if f.kind != "float"]


@pytest.mark.parametrize("name", INT_AND_CODEBOOK)
def test_to_unsigned_round_trip(name):
    fmt = FORMATS[name]
    hi = fmt.qmax if fmt.kind == "int" else len(fmt.levels) - 1
    lo = fmt.qmin if fmt.kind == "int" else 0
    codes = torch.arange(lo, hi + 1).to(fmt.torch_dtype)
    u = to_unsigned(codes, fmt)
    assert u.dtype == torch.uint8
    assert u.tolist() == list(range(hi - lo + 1))  # q - qmin, in order
    assert int(u.max()) < fmt.n_codes  # fits the packer
    back = from_unsigned(unpack(pack(u, fmt.bits), fmt.bits, u.numel()), fmt)
    assert back.dtype == fmt.torch_dtype
    assert torch.equal(back, codes)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 4, 7], ids=lambda b: f"{b}bit")
def test_code_that_does_not_fit(bits):
    codes = torch.tensor([0, 1 << bits], dtype=torch.uint8)
    with pytest.raises(LowbitError, match=f"does not fit in {bits} bits"):
        pack(codes, bits)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32], ids=str)
def test_pack_wrong_dtype(dtype):
    with pytest.raises(LowbitError, match="uint8"):
        pack(torch.zeros(4, dtype=dtype), 4)
    with pytest.raises(LowbitError, match="uint8"):
        unpack(torch.zeros(2, dtype=dtype), 4, 4)


@pytest.mark.parametrize(("bits", "n", "nbytes"), [(4, 5, 2), (4, 5, 4), (3, 8, 4), (1, 9, 1), (8, 3, 2)])
def test_unpack_wrong_length(bits, n, nbytes):
    with pytest.raises(LowbitError, match="packed last dim"):
        unpack(torch.zeros(nbytes, dtype=torch.uint8), bits, n)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(LowbitError, match="1..8 bits"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(LowbitError, match="1..8 bits"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


# --- codec: codes <-> stored bytes for every format ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_codec_round_trip(name):
    fmt = FORMATS[name]
    spec = QuantSpec(name, symmetric=name != "uint1")
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(5)) * 4
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, scale, zp, spec)
    data = encode(codes, fmt)
    assert data.dtype == torch.uint8 and data.shape == (3, stored_bytes(13, fmt))
    back = decode(data, fmt, 13)
    assert back.dtype == codes.dtype
    assert torch.equal(back.view(torch.uint8), codes.view(torch.uint8))  # bitwise, also for floats
