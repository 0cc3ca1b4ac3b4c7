"""Per-layer weight formats (``WeightOnly.layers``, a mixed-precision plan): the config, every method
in memory and streamed, GPTQ and AWQ on input groups whose Linears differ in format, save/load, and
plans naming layers the model does not quantize (refused before the model changes)."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QLinear, WeightOnly, quantize_
from lowbit.algorithms.hqq import hqq
from lowbit.algorithms.rtn import rtn
from lowbit.core.spec import PerChannel, PerGroup
from lowbit.export.streaming import quantize_folder
from lowbit.nn.modules import QEmbedding
from lowbit.transforms import config_from_dict
from support import tiny_llama

ATTN = "model.layers.0.self_attn"
MIXED = {  # q/k/v share an input: q 3-bit g16, k/v 4-bit g32 (the config: 4-bit g16)
    f"{ATTN}.q_proj": {"bits": 3, "group_size": 16},
    f"{ATTN}.k_proj": {"bits": 4, "group_size": 32},
    f"{ATTN}.v_proj": {"bits": 4, "group_size": 32},
    "model.layers.1.mlp.down_proj": {"bits": 2, "group_size": None, "symmetric": True},
}
W4 = {"bits": 4, "group_size": 16}


def _calib(n=4, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, length), generator=g) for _ in range(n)]


def _rel_err(model, ref_model, ids):
    with torch.no_grad():
        ref, out = ref_model(ids).logits, model(ids).logits
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def _check_specs(model, config):
    """Every quantized layer has the spec its fqn asks for; returns how many were checked."""
    n = 0
    for fqn, m in model.named_modules():
        if isinstance(m, QEmbedding):
            assert m.spec == config.embedding_spec(fqn), fqn
        elif isinstance(m, QLinear) and fqn != "lm_head":  # the tied head: the embedding's spec
            assert m.spec == config.linear_spec(fqn), fqn
        n += isinstance(m, (QLinear, QEmbedding))
    return n


# ---- the config ---------------------------------------------------------------------------------


def test_layers_round_trip_through_json_and_give_each_fqn_its_spec():
    c = WeightOnly(**W4, method="gptq", layers=MIXED)
    back = config_from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.layers == MIXED and back.version == 7
    assert hash(back) == hash(c)  # ``layers`` is left out of the hash; equality compares it
    assert c != WeightOnly(**W4, method="gptq")
    q = c.linear_spec(f"{ATTN}.q_proj")
    assert q.format == "uint3" and q.granularity == PerGroup(16) and not q.symmetric
    down = c.linear_spec("model.layers.1.mlp.down_proj")
    assert down.format == "int2" and down.symmetric and isinstance(down.granularity, PerChannel)
    assert c.linear_spec("model.layers.0.mlp.up_proj") == c.linear_spec() == WeightOnly(**W4).linear_spec()


def test_layers_entry_is_copied():
    entry = {"bits": 3}
    c = WeightOnly(layers={"a": entry})
    entry["bits"] = 9
    assert c.layers == {"a": {"bits": 3}} and c.linear_spec("a").format == "uint3"


def test_embedding_entry_falls_back_to_the_embedding_options():
    c = WeightOnly(**W4, embedding_bits=8, embedding_group_size=0, layers={"emb": {"group_size": 32}})
    spec = c.embedding_spec("emb")
    assert spec.format == "uint8" and spec.granularity == PerGroup(32)
    assert isinstance(c.embedding_spec("other").granularity, PerChannel)
    assert WeightOnly(quantize_embeddings=False, layers={"emb": {"bits": 3}}).embedding_spec("emb") is None


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"bits": 9}, "bits must be an integer 2..8, got 9"),
        ({"bits": 1}, "bits must be an integer 2..8, got 1"),
        ({"bits": True}, "bits must be"),
        ({"group_size": -16}, "group_size must be a positive integer"),
        ({"group_size": 2.5}, "group_size must be"),
        ({"bits": 4, "gruop_size": 32}, r"unknown keys \['gruop_size'\]"),
        ({"symmetric": "yes"}, "symmetric must be"),
        ("w4g32", "must be a mapping"),
    ],
    ids=["bits9", "bits1", "bits-bool", "group-negative", "group-float", "unknown-key", "sym", "not-a-dict"],
)
def test_bad_entries_name_the_layer(entry, message):
    with pytest.raises(LowbitError, match=message) as e:
        WeightOnly(layers={"model.layers.2.mlp.up_proj": entry})
    assert "model.layers.2.mlp.up_proj" in str(e.value)


def test_bad_layers_container_and_key():
    with pytest.raises(LowbitError, match="must map module names"):
        WeightOnly(layers=[("a", {"bits": 3})])
    with pytest.raises(LowbitError, match="keys must be module names"):
        WeightOnly(layers={3: {"bits": 3}})


def test_version_5_dict_loads_without_overrides():
    old = {k: v for k, v in WeightOnly(**W4, method="awq").to_dict().items() if k != "layers"}
    c = config_from_dict(old | {"version": 5})
    assert c.layers == {} and c.version == 5 and c == WeightOnly(**W4, method="awq", version=5)


# ---- calibration-free methods -------------------------------------------------------------------


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_each_layer_rounded_alone_with_its_own_spec(method):
    layers = {"0": {"bits": 2, "group_size": 16}, "3": {"bits": 8, "group_size": 0, "symmetric": True}}
    config = WeightOnly(**W4, method=method, layers=layers)
    model, ref = _seq(), _seq()
    summary = quantize_(model, config)
    assert _check_specs(model, config) == 3
    assert model[1].spec == config.linear_spec()  # no entry: the config's own
    for fqn, spec in (
        ("0", config.embedding_spec("0")),
        ("1", config.linear_spec()),
        ("3", config.linear_spec("3")),
    ):
        w = ref.get_submodule(fqn).weight.detach()
        alone = rtn(w, spec) if method == "rtn" else hqq(w, spec, name=f"{fqn}.weight")
        assert torch.equal(
            model.get_submodule(fqn).dequantized_weight(torch.float32), alone.dequantize().float()
        )
    assert "int8 per_channel sym" in summary.quantized["3"] and "uint2 g16" in summary.quantized["0"]
    assert "formats: " in str(summary) and "uint2 g16 asym x1" in str(summary)


# ---- the block pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_mixed_specs_inside_a_stacked_group(method):
    config = WeightOnly(**W4, method=method, compute_dtype="float32", layers=MIXED)
    model, ref = tiny_llama(), tiny_llama()
    summary = quantize_(model, config, _calib())
    assert _check_specs(model, config) == 16
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.spec.format, attn.k_proj.spec.granularity) == ("uint3", PerGroup(32))
    assert attn.o_proj.spec == config.linear_spec()
    assert (
        "uint3 g16" in summary.quantized[f"{ATTN}.q_proj"]
        and "uint4 g32" in summary.quantized[f"{ATTN}.v_proj"]
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert _rel_err(model, ref, ids) < 0.05  # measured: 0.011 both (uniform w4g16: 0.009)


def test_gptq_mixed_group_rounds_each_linear_from_the_shared_hessian():
    """q (3-bit) differs: k and v (same spec) are stacked and get exactly the codes of rounding k/v
    stacked on their own, q those of rounding q alone."""
    from lowbit.transforms import block as blk
    from lowbit.transforms import block_round
    from lowbit.transforms import sequential as seq
    from lowbit.transforms.mappings import architecture

    base = tiny_llama()
    cap = seq.capture(base, "model.layers", _calib())
    block = base.model.layers[0]
    mods = dict(blk._linears(block, "model.layers.0", lambda n: True))
    plan = seq.block_plan(WeightOnly(**W4, method="gptq", compute_dtype="float32", layers=MIXED))
    groups = blk._input_groups(block, architecture(base.config), list(mods.items()))
    stats = blk.gather(block, groups, plan, cap.hidden, cap.kwargs[0])
    names = groups["self_attn.q_proj"]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    st = stats["self_attn.q_proj"]
    mixed = block_round.round_group(names, mods, st, plan, "model.layers.0", {})
    stacked = block_round.round_group(names[1:], mods, st, plan, "model.layers.0", {})
    for n in names[1:]:
        assert mixed[n].spec == plan.spec_of(f"model.layers.0.{n}") == stacked[n].spec
        assert torch.equal(mixed[n].codes, stacked[n].codes) and torch.equal(mixed[n].scale, stacked[n].scale)
    q_spec = plan.spec_of(f"{ATTN}.q_proj")
    alone, _ = block_round.round_weight(mods[names[0]].weight.detach(), st, plan, q_spec, "q")
    assert torch.equal(mixed[names[0]].codes, alone.codes) and mixed[names[0]].spec.format == "uint3"


def test_qat_trains_each_linear_in_its_own_spec():
    config = WeightOnly(
        **W4, method="qat", compute_dtype="float32", layers=MIXED, train_epochs=1, train_batch=2
    )
    model = tiny_llama()
    summary = quantize_(model, config, _calib())
    assert _check_specs(model, config) == 16 and len(summary.trained) == 2


def test_streamed_run_equals_in_memory(tmp_path):
    config = WeightOnly(**W4, method="awq+gptq", layers=MIXED | {"model.embed_tokens": {"bits": 8}})
    tiny_llama().save_pretrained(tmp_path / "src")
    model = tiny_llama()
    quantize_(model, config, _calib())
    assert model.model.embed_tokens.spec.format == "uint8" and model.lm_head.spec.format == "uint8"
    lowbit.save(model, tmp_path / "mem")
    quantize_folder(tmp_path / "src", config, tmp_path / "out", _calib(), progress=False)
    a, b = (lowbit.load(tmp_path / d) for d in ("mem", "out"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    meta = [json.loads((tmp_path / d / "quant_config.json").read_text()) for d in ("mem", "out")]
    assert meta[0]["modules"] == meta[1]["modules"] and meta[0]["config"] == meta[1]["config"]
    assert meta[1]["config"]["layers"] == config.layers


# ---- save / load --------------------------------------------------------------------------------


def test_save_load_keeps_every_layer_spec(tmp_path):
    config = WeightOnly(**W4, layers=MIXED | {"model.embed_tokens": {"bits": 6, "group_size": 0}})
    model = tiny_llama()
    quantize_(model, config)
    lowbit.save(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert saved["config"]["layers"] == config.layers and saved["config"]["version"] == 7
    loaded = lowbit.load(tmp_path / "q")
    assert config_from_dict(loaded.lowbit_config) == config
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    assert {n: m.spec for n, m in loaded.named_modules() if isinstance(m, (QLinear, QEmbedding))} == specs
    assert specs["model.embed_tokens"].format == "uint6" and specs["lm_head"] == specs["model.embed_tokens"]
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ---- plans naming what the model does not quantize ----------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,why",
    [
        ("model.layers.7.mlp.down_proj", {}, "no such module"),
        ("model.norm", {}, "a LlamaRMSNorm, not a Linear"),
        ("model.layers.0.mlp.down_proj", {"exclude": ["*.down_proj"]}, "deselected"),
        ("lm_head", {}, "tied to 'model.embed_tokens'"),
    ],
    ids=["missing", "norm", "excluded", "tied-head"],
)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bad_names_are_refused_before_anything_changes(name, kwargs, why, method):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {name: {"bits": 3}, f"{ATTN}.q_proj": {"bits": 3}}  # a good entry too
    with pytest.raises(LowbitError, match=why) as e:
        quantize_(model, WeightOnly(**W4, method=method, layers=layers), _calib(), **kwargs)
    assert "names 1 layer(s)" in str(e.value) and repr(name) in str(e.value)
    assert not any(isinstance(m, (QLinear, QEmbedding)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_many_bad_names_are_listed_up_to_five():
    layers = {f"model.layers.{i}.nope": {"bits": 3} for i in range(7)}
    with pytest.raises(LowbitError, match="7 layer") as e:
        quantize_(tiny_llama(), WeightOnly(layers=layers))
    assert "model.layers.4.nope" in str(e.value) and "model.layers.5.nope" not in str(e.value)
    assert "and 2 more" in str(e.value)


def test_embedding_kept_float_cannot_take_an_entry():
    layers = {"model.embed_tokens": {"bits": 3}}
    with pytest.raises(LowbitError, match="kept float"):
        quantize_(tiny_llama(), WeightOnly(quantize_embeddings=False, layers=layers))


def test_streamed_run_refuses_bad_names_before_writing(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    config = WeightOnly(**W4, method="gptq", layers={"model.layers.0.mlp.gate": {"bits": 3}})
    with pytest.raises(LowbitError, match="model.layers.0.mlp.gate"):
        quantize_folder(tmp_path / "src", config, tmp_path / "out", _calib(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
