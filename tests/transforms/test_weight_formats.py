"""Weight formats beyond int on real layers (``WeightOnly.format`` and per-layer ``"format"`` entries):
nf4, fp4, fp8, log2, ternary, binary and fitted k-means tables through rtn, gptq, awq and awq+gptq,
save/load, and the method/format pairs that are refused."""

import json

import pytest
import torch

import lowbit
from lowbit import LowbitError, QLinear, WeightOnly, quantize_
from lowbit.nn.modules import QEmbedding
from lowbit.transforms import config_from_dict
from support import tiny_llama

FORMATS = {"nf4": "nf4", "fp4": "fp4_e2m1", "fp8": "fp8_e4m3", "log2": "log2", "ternary": "ternary",
           "binary": "binary"}  # fmt: skip
MLP = "model.layers.1.mlp"


def _calib(n=4, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, length), generator=g) for _ in range(n)]


def _rel_err(model, ids):
    with torch.no_grad():
        ref, out = tiny_llama()(ids).logits, model(ids).logits
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_quantizes_saves_and_reloads_exactly(fmt, tmp_path):
    model = tiny_llama()
    quantize_(model, WeightOnly(format=fmt, group_size=16))
    layers = [m for m in model.modules() if isinstance(m, (QLinear, QEmbedding))]
    assert layers and {m.spec.format for m in layers} == {FORMATS[fmt]}
    assert all(m.zero_point is None for m in layers) or fmt == "ternary"
    ids = _calib(1)[0]
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert _rel_err(model, ids) < {"fp8": 0.01, "ternary": 2.0, "binary": 2.0}.get(fmt, 0.5)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
def test_kmeans_tables_through_every_method_save_and_reload(method, tmp_path):
    model = tiny_llama()
    calib = _calib() if method != "rtn" else None
    config = WeightOnly(format="kmeans", bits=3, method=method, layers={f"{MLP}.up_proj": {"bits": 4}})
    quantize_(model, config, calib=calib)
    mlp = model.model.layers[1].mlp
    assert (mlp.down_proj.spec.format, mlp.up_proj.spec.format) == ("lut3", "lut4")
    assert mlp.down_proj.levels.shape == (32, 8) and model.model.embed_tokens.spec.format == "uint3"
    lowbit.save(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    ids = _calib(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert _rel_err(model, ids) < 0.2


def test_fp8_is_closer_than_nf4_and_nf4_than_log2():
    ids = _calib(1)[0]
    errs = {}
    for fmt in ("fp8", "nf4", "log2"):
        model = tiny_llama()
        quantize_(model, WeightOnly(format=fmt, group_size=16))
        errs[fmt] = _rel_err(model, ids)
    assert errs["fp8"] < errs["nf4"] < errs["log2"]


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_data_methods_take_scale_only_formats_and_beat_rtn(method):
    calib = _calib()
    errs = {}
    for m in ("rtn", method):
        model = tiny_llama()
        quantize_(
            model, WeightOnly(format="nf4", group_size=16, method=m), calib=calib if m != "rtn" else None
        )
        errs[m] = sum(_rel_err(model, ids) for ids in calib)
    assert {q.spec.format for q in model.modules() if isinstance(q, QLinear)} == {"nf4"}
    assert errs[method] < errs["rtn"]


def test_formats_mix_per_layer_inside_a_stacked_group():
    layers = {f"{MLP}.gate_proj": {"format": "fp8"}, f"{MLP}.up_proj": {"format": "nf4", "group_size": 32},
              f"{MLP}.down_proj": {"bits": 3}}  # fmt: skip
    config = WeightOnly(bits=4, group_size=16, method="awq+gptq", layers=layers)
    model = tiny_llama()
    quantize_(model, config, calib=_calib())
    mlp = model.model.layers[1].mlp
    assert (mlp.gate_proj.spec.format, mlp.up_proj.spec.format, mlp.down_proj.spec.format) == (
        "fp8_e4m3", "nf4", "uint3")  # fmt: skip
    assert mlp.up_proj.spec.granularity.size == 32
    assert model.model.layers[0].mlp.gate_proj.spec.format == "uint4"
    assert _rel_err(model, _calib(1, seed=7)[0]) < 0.5


def test_format_round_trips_through_json_and_old_dicts_load_as_int():
    c = WeightOnly(format="nf4", group_size=64, method="gptq", layers={"a": {"format": "fp8"}})
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.format == "nf4" and back.version == 7
    old = {k: v for k, v in WeightOnly(group_size=64).to_dict().items() if k != "format"} | {"version": 6}
    assert config_from_dict(old).format == "int"


def test_embedding_bits_keep_embeddings_int():
    c = WeightOnly(format="nf4", embedding_bits=8, embedding_group_size=0)
    assert c.linear_spec("x").format == "nf4" and c.embedding_spec("e").format == "uint8"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "int5"}, r"unknown weight format 'int5'; known: int, nf4"),
        ({"format": "nf4", "method": "hqq"}, "method hqq fits integer grids only; format nf4"),
        (
            {"layers": {"a": {"format": "fp4"}}, "method": "qat"},
            "method qat fits integer grids only; format fp4",
        ),
        ({"format": "binary", "method": "gptq"}, "format binary .* takes method rtn, not gptq"),
        ({"layers": {"a": {"format": "nf5"}}}, r"layers\['a'\]: unknown format 'nf5'"),
        ({"layers": {"a": {"format": "nf4", "bits": 3}}}, r"layers\['a'\]: format nf4 has 4 bits, not 3"),
        ({"format": "kmeans", "bits": 5}, "format kmeans takes 2..4 bits"),
        ({"format": "kmeans", "method": "awq"}, "format kmeans takes method rtn, gptq, awq\\+gptq, not awq"),
        ({"layers": {"a": {"format": "kmeans", "group_size": 64}}}, "one table per output channel"),
    ],
)
def test_bad_formats_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        WeightOnly(**kwargs)
