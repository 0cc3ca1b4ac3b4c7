"""Candidate formats: names, real stored bytes (what QLinear holds), bad names refused."""

import pytest
from torch import nn

from lowbit.algorithms.rtn import rtn
from lowbit.autotune.candidates import Candidate, parse_candidate, parse_candidates
from lowbit.core.errors import LowbitError
from lowbit.nn.modules import QLinear


@pytest.mark.parametrize(
    "name",
    [
        "w2g64",
        "w3g64",
        "w4g128",
        "w8",
        "w4g32-sym",
        "w6g128",
        "w3g100",
        "nf4g64",
        "fp4g32",
        "fp8",
        "log2g128",
        "ternaryg64",
        "kmeans3",
        "kmeans4",
    ],  # fmt: skip
)
@pytest.mark.parametrize("cols", [256, 576])
def test_nbytes_is_what_a_qlinear_stores(name, cols):
    c = parse_candidate(name)
    assert c.name == name
    lin = nn.Linear(cols, 48, bias=False)
    q = QLinear.from_float(lin, c.spec("float16"))
    q.set_weight(rtn(lin.weight.detach(), c.spec("float16")))
    stored = sum(t.nbytes for t in (q.qweight, q.scale, q.zero_point, q.levels) if t is not None)
    assert c.nbytes((48, cols), "float16") == stored


def test_fits_and_entries():
    assert (
        Candidate(3, 64).fits((8, 128))
        and Candidate(3, 64).fits((8, 96))
        and not Candidate(3, 64).fits((8, 32))
    )
    assert Candidate(8).fits((8, 97))
    assert Candidate(4, 128, True).entry() == {"bits": 4, "group_size": 128, "symmetric": True}
    assert parse_candidate("nf4g64").entry() == {"format": "nf4", "group_size": 64}
    assert parse_candidate("fp8").spec().format == "fp8_e4m3" and parse_candidate("fp8").bits == 8


def test_parse_list_and_errors():
    assert [c.name for c in parse_candidates("w4g128, w3g64,w4g128")] == ["w4g128", "w3g64"]
    for bad in (
        "w9",
        "w4g0",
        "int4",
        "w1g64",
        "w4g",
        "nf3",
        "nf4g0",
        "fp4-sym",
        "binary",
        "kmeans5",
        "kmeans3g64",
    ):
        with pytest.raises(LowbitError, match="bad candidate"):
            parse_candidate(bad)
    with pytest.raises(LowbitError, match="no candidate"):
        parse_candidates(" , ")


def test_bits_per_weight_of_w3g64_counts_scales_and_zero_points():
    c = Candidate(3, 64)
    assert 8 * c.nbytes((576, 1536)) / (576 * 1536) == pytest.approx(3 + 24 / 64)
    nf4 = parse_candidate("nf4g64")  # scales only: no zero point
    assert 8 * nf4.nbytes((576, 1536)) / (576 * 1536) == pytest.approx(4 + 16 / 64)
    km3 = parse_candidate("kmeans3")  # per row: 8 fp16 levels and one fp16 scale
    assert 8 * km3.nbytes((576, 1536)) / (576 * 1536) == pytest.approx(3 + 16 * 9 / 1536)
    assert km3.entry() == {"format": "kmeans", "bits": 3}
