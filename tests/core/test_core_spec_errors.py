"""QuantSpec, granularity lowering and every error path of lowbit.core."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.core import (
    FORMATS,
    LowbitError,
    NonFiniteError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    block_size,
    choose_qparams,
    dequantize,
    fake_quantize,
    get_format,
    quantize,
)
from lowbit.core.spec import qparam_shape

# --- granularity lowering (exact) --------------------------------------------------------------------

# (id, shape, granularity, block_size, qparam shape): the table of the spec docstring
BLOCKS = [
    ("tensor", (4, 6), PerTensor(), (4, 6), (1, 1)),
    ("tensor-0d", (), PerTensor(), (), ()),
    ("channel0", (4, 6), PerChannel(0), (1, 6), (4, 1)),
    ("channel-last-3d", (2, 3, 5), PerChannel(-1), (2, 3, 1), (1, 1, 5)),
    ("group128-576", (3, 576), PerGroup(128), (1, 128), (3, 5)),
    ("group32-100", (4, 100), PerGroup(32), (1, 32), (4, 4)),
    ("group-bigger-than-dim", (2, 5), PerGroup(128), (1, 128), (2, 1)),
    ("group-axis0", (13, 3), PerGroup(8, axis=0), (8, 1), (2, 3)),
    ("token-3d", (2, 3, 20), PerToken(), (1, 1, 20), (2, 3, 1)),
    ("token-1d", (7,), PerToken(), (7,), (1,)),
]


@pytest.mark.parametrize(
    ("shape", "gran", "block", "pshape"), [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS]
)
def test_block_size_table(shape, gran, block, pshape):
    assert block_size(shape, gran) == block
    assert QuantSpec(granularity=gran).block_size(shape) == block
    assert qparam_shape(shape, block) == pshape
    x = torch.randn(shape)
    scale, zp = choose_qparams(x, QuantSpec("int4", granularity=gran))
    assert tuple(scale.shape) == pshape and tuple(zp.shape) == pshape


# --- QuantSpec serialization --------------------------------------------------------------------------

SPECS = [
    QuantSpec(),
    QuantSpec("uint4", symmetric=False, granularity=PerChannel(1), scale_dtype="float16"),
    QuantSpec("int3", granularity=PerGroup(32, axis=0), scale_dtype="bfloat16", clip_ratio=0.9),
    QuantSpec("nf4", granularity=PerGroup(64)),
    QuantSpec("fp8_e4m3", granularity=PerToken()),
    QuantSpec("ternary", granularity=PerTensor()),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity.kind}")
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert d["granularity"]["kind"] == spec.granularity.kind
    assert QuantSpec.from_dict(d) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == spec  # survives a JSON file


def test_spec_from_dict_defaults():
    assert QuantSpec.from_dict({}) == QuantSpec()
    assert QuantSpec.from_dict({"granularity": {"kind": "per_group"}}).granularity == PerGroup()


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"format": "int8", "bits": 8}, "unknown QuantSpec fields"),
        ({"granularity": {"kind": "per_block"}}, "unknown granularity kind"),
        ({"granularity": {"size": 32}}, "unknown granularity kind"),
        ({"granularity": {"kind": "per_group", "groups": 4}}, "unknown per_group fields"),
        ({"granularity": {"kind": "per_tensor", "axis": 0}}, "unknown per_tensor fields"),
        ({"format": "int9"}, "unknown format"),
        ({"granularity": {"kind": "per_group", "size": 0}}, "group size"),
    ],
    ids=["extra-field", "bad-kind", "no-kind", "extra-group-field", "extra-tensor-field", "bad-format",
         "bad-group-size"],
)  # fmt: skip
def test_spec_from_dict_errors(d, match):
    with pytest.raises(LowbitError, match=match):
        QuantSpec.from_dict(d)


# --- construction errors -----------------------------------------------------------------------------


def test_unknown_format_lists_known_ones():
    with pytest.raises(LowbitError) as err:
        get_format("int16")
    msg = str(err.value)
    assert "int16" in msg and all(name in msg for name in FORMATS)
    with pytest.raises(LowbitError, match="known: .*nf4"):
        QuantSpec("fp4")
    assert get_format(FORMATS["nf4"]) is FORMATS["nf4"]


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, math.nan, math.inf], ids=str)
def test_bad_clip_ratio(ratio):
    with pytest.raises(LowbitError, match="clip_ratio"):
        QuantSpec(clip_ratio=ratio)


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", "float8_e4m3fn"])
def test_bad_scale_dtype(dtype):
    with pytest.raises(LowbitError, match="scale_dtype"):
        QuantSpec(scale_dtype=dtype)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.kind != "int"])
def test_asymmetric_needs_int_format(name):
    with pytest.raises(LowbitError, match="symmetric only"):
        QuantSpec(name, symmetric=False)


@pytest.mark.parametrize("size", [0, -1])
def test_bad_group_size(size):
    with pytest.raises(LowbitError, match="group size"):
        PerGroup(size)


@pytest.mark.parametrize(
    "gran", [PerChannel(2), PerChannel(-3), PerGroup(4, axis=2), PerGroup(4, axis=-3)], ids=repr
)
def test_axis_out_of_range(gran):
    spec = QuantSpec("int8", granularity=gran)
    x = torch.randn(4, 8)
    with pytest.raises(LowbitError, match="axis .* out of range for a 2-d tensor"):
        choose_qparams(x, spec)
    with pytest.raises(LowbitError, match="out of range"):
        quantize(x, torch.ones(4, 1), None, spec)


def test_symmetric_needs_room():
    """uint1 has codes {0, 1}: no symmetric range around a zero point; asymmetric works."""
    with pytest.raises(LowbitError, match="no room"):
        choose_qparams(torch.randn(8), QuantSpec("uint1"))
    scale, zp = choose_qparams(torch.randn(8), QuantSpec("uint1", symmetric=False))
    assert scale.shape == zp.shape == (1,)


# --- runtime errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_names_the_tensor(bad, dtype):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    x = x.to(dtype)
    spec = QuantSpec("int4", granularity=PerGroup(4))
    scale, zp = choose_qparams(torch.randn(4, 8), spec)
    calls = [
        lambda: choose_qparams(x, spec, name="layers.3.mlp.up_proj.weight"),
        lambda: quantize(x, scale, zp, spec, name="layers.3.mlp.up_proj.weight"),
        lambda: fake_quantize(x, spec, name="layers.3.mlp.up_proj.weight"),
    ]
    for call in calls:
        with pytest.raises(NonFiniteError, match=r"layers\.3\.mlp\.up_proj\.weight: 1 of 32"):
            call()
    assert issubclass(NonFiniteError, LowbitError) and issubclass(LowbitError, ValueError)


@pytest.mark.parametrize(
    ("gran", "bad_shape"),
    [(PerTensor(), (4, 1)), (PerChannel(0), (1, 1)), (PerGroup(4), (1, 2)), (PerGroup(4), (4, 3))],
    ids=["tensor", "channel", "group-broadcast", "group-count"],
)
def test_qparam_shape_mismatch(gran, bad_shape):
    """A scale that would silently broadcast is refused with the expected shape in the message."""
    spec = QuantSpec("int8", symmetric=False, granularity=gran)
    x = torch.randn(4, 8)
    scale, zp = choose_qparams(x, spec)
    codes = quantize(x, scale, zp, spec)
    with pytest.raises(LowbitError, match=rf"scale shape \({bad_shape[0]}, {bad_shape[1]}\) !="):
        quantize(x, torch.ones(bad_shape), zp, spec)
    with pytest.raises(LowbitError, match="scale shape"):
        dequantize(codes, torch.ones(bad_shape), zp, spec)
    with pytest.raises(LowbitError, match="zero_point shape"):
        dequantize(codes, scale, torch.zeros(bad_shape, dtype=torch.int8), spec)
    with pytest.raises(LowbitError, match="scale shape"):
        fake_quantize(x, spec, torch.ones(bad_shape), zp)
