"""quantize_: selection, ties, summaries, configs and schemes, and its errors."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, NonFiniteError, WeightOnly, quantize_
from lowbit.core import FormatVersionError, PerChannel, PerGroup
from lowbit.transforms import QuantConfig, Selector, config_from_dict, parse_scheme


class Tiny(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 96)
        self.block = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 96))
        self.head = nn.Linear(96, 50, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


def test_quantizes_all_layers_and_ties():
    m = Tiny()
    s = quantize_(m, WeightOnly(bits=4, group_size=32))
    assert set(s.quantized) == {"emb", "block.0", "block.2", "head"}
    assert s.tied == {"head": "emb"}
    assert m.head.qweight is m.emb.qweight
    assert isinstance(m.block[0], lowbit.QLinear) and isinstance(m.emb, lowbit.QEmbedding)


def test_quantized_output_close_to_float():
    m, ids = Tiny(), torch.randint(0, 50, (2, 9))
    ref = m(ids)
    quantize_(m, WeightOnly(bits=8, group_size=None, symmetric=True))
    out = m(ids)
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 1e-3  # int8 per channel; measured ~2e-5


@pytest.mark.parametrize(
    "include,exclude,expected",
    [
        ((), ("head", "emb"), {"block.0", "block.2"}),
        (("block.*",), (), {"block.0", "block.2"}),
        (("re:block\\.[0-9]+",), ("block.2",), {"block.0"}),
    ],
    ids=["exclude", "glob", "regex"],
)
def test_include_exclude(include, exclude, expected):
    m = Tiny(tie=False)
    s = quantize_(m, WeightOnly(bits=4, group_size=32), include=include, exclude=exclude)
    assert set(s.quantized) == expected


def test_embeddings_can_stay_float():
    m = Tiny(tie=False)
    s = quantize_(m, WeightOnly(bits=4, group_size=32, quantize_embeddings=False))
    assert "emb" in s.skipped and isinstance(m.emb, nn.Embedding)


def test_tied_head_follows_its_embedding_spec():
    m = Tiny()
    s = quantize_(m, WeightOnly(bits=4, group_size=32, embedding_bits=8, embedding_group_size=0))
    assert s.tied == {"head": "emb"} and m.head.qweight is m.emb.qweight
    assert m.head.spec == m.emb.spec and m.head.spec.format == "uint8"
    assert m.block[0].spec.format == "uint4"


def test_embedding_spec_override():
    c = WeightOnly(bits=4, group_size=128, embedding_bits=8, embedding_group_size=0)
    assert c.embedding_spec().format == "uint8" and isinstance(c.embedding_spec().granularity, PerChannel)
    assert isinstance(c.linear_spec().granularity, PerGroup)


def test_no_quantizable_layer():
    with pytest.raises(LowbitError, match="no quantizable layer"):
        quantize_(nn.Sequential(nn.ReLU()), WeightOnly())


def test_nan_weight_names_the_module():
    m = Tiny(tie=False)
    with torch.no_grad():
        m.block[2].weight[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"block\.2\.weight"):
        quantize_(m, WeightOnly(bits=4, group_size=32))


def test_unknown_config_type():
    class Other(QuantConfig):
        pass

    with pytest.raises(LowbitError, match="no handler for config Other"):
        quantize_(Tiny(), Other())


def test_bad_pattern():
    with pytest.raises(LowbitError, match="bad module pattern"):
        Selector(include=["re:("])


def test_config_round_trip_and_validation():
    c = WeightOnly(bits=3, group_size=64, symmetric=True)
    assert config_from_dict(c.to_dict()) == c
    with pytest.raises(FormatVersionError, match="newer"):
        config_from_dict(c.to_dict() | {"version": 99})
    with pytest.raises(LowbitError, match="unknown WeightOnly fields"):
        config_from_dict(c.to_dict() | {"bogus": 1})
    with pytest.raises(LowbitError, match="unknown quantization config type"):
        config_from_dict({"type": "Nope"})
    with pytest.raises(LowbitError, match="bits must be 2..8"):
        WeightOnly(bits=9)
    with pytest.raises(LowbitError, match="unknown weight method"):
        WeightOnly(method="magic")


@pytest.mark.parametrize(
    "scheme,bits,group,sym",
    [
        ("w8", 8, None, True),
        ("w4g128", 4, 128, False),
        ("w4g64-sym", 4, 64, True),
        ("W3G64", 3, 64, False),
        ("w8g32-asym", 8, 32, False),
    ],
)
def test_parse_scheme(scheme, bits, group, sym):
    c = parse_scheme(scheme)
    assert (c.bits, c.group_size, c.symmetric) == (bits, group, sym)


def test_parse_scheme_embedding_override():
    c = parse_scheme("w4g128e8")
    assert (c.bits, c.group_size, c.embedding_bits, c.embedding_group_size) == (4, 128, 8, 0)
    assert isinstance(c.embedding_spec().granularity, PerChannel)
    c = parse_scheme("w4g32e8g32-sym")  # a GGUF Q4_0 file: Q4_0 Linears, Q8_0 embeddings
    assert (c.bits, c.group_size, c.symmetric) == (4, 32, True)
    assert (c.embedding_bits, c.embedding_group_size) == (8, 32)
    assert c.embedding_spec().granularity.size == 32 and c.embedding_spec().format == "int8"


@pytest.mark.parametrize(
    "scheme,fmt,group",
    [("nf4g64", "nf4", 64), ("fp8", "fp8_e4m3", None), ("kmeans3", "lut3", None), ("log2g128", "log2", 128)],
)
def test_parse_scheme_other_formats(scheme, fmt, group):
    spec = parse_scheme(scheme).linear_spec()
    assert spec.format == fmt and getattr(spec.granularity, "size", None) == group


@pytest.mark.parametrize(
    "scheme", ["w9", "int4", "w4g", "w1g32", "", "w4e", "w4g128e9", "nf3", "kmeans5", "kmeans3g64", "nf4g0"]
)
def test_parse_scheme_rejects(scheme):
    with pytest.raises(LowbitError):
        parse_scheme(scheme)
