"""Block-by-block pipeline (GPTQ / AWQ / SmoothQuant orchestration) on tiny random decoders."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, SmoothQuant, WeightOnly, quantize_
from lowbit.core import FormatVersionError
from lowbit.transforms import Selector, config_from_dict, parse_scheme, quantize_sequential
from lowbit.transforms.mappings import architecture, fold_scales, resolve
from support import tiny_llama

W4 = {"bits": 4, "group_size": 16}


def _calib(n=6, length=24, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def _rel_err(model, ref_model, ids):
    with torch.no_grad():
        ref, out = ref_model(ids).logits, model(ids).logits
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


# ---- configs and schemes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        WeightOnly(method="gptq", damp=0.05, act_order=False),
        WeightOnly(bits=3, group_size=None, method="awq+gptq", awq_grid=10),
        WeightOnly(method="hqq"),
        SmoothQuant(alpha=0.7),
    ],
    ids=["gptq", "awq+gptq", "hqq", "smoothquant"],
)
def test_config_round_trip(config):
    assert config_from_dict(config.to_dict()) == config


def test_old_weight_only_dicts_still_load():
    old = {"type": "WeightOnly", "bits": 4, "group_size": 128, "symmetric": False, "scale_dtype": "float16",
           "embedding_bits": None, "embedding_group_size": None, "quantize_embeddings": True,
           "method": "rtn", "version": 1}  # fmt: skip
    c = config_from_dict(old)
    assert c.method == "rtn" and c.version == 1 and c.linear_spec() == WeightOnly().linear_spec()
    assert c.true_sequential is False and c.compute_dtype == "float32"  # what versions 1 to 3 ran
    new = WeightOnly(method="gptq").to_dict()
    v2 = {k: v for k, v in new.items() if k not in ("true_sequential", "compute_dtype")}
    assert config_from_dict(v2 | {"version": 2}).true_sequential is False
    v3 = {k: v for k, v in new.items() if k != "compute_dtype"} | {"version": 3}
    assert config_from_dict(v3).compute_dtype == "float32"
    v4 = {k: v for k, v in new.items() if not k.startswith("train_")} | {"version": 4}
    assert config_from_dict(v4) == WeightOnly(method="gptq", version=4)  # version 5 added method qat
    v5 = {k: v for k, v in new.items() if k != "layers"} | {"version": 5}
    assert config_from_dict(v5).layers == {}  # version 6 added per-layer formats
    v6 = {k: v for k, v in new.items() if k != "format"} | {"version": 6}
    assert config_from_dict(v6).format == "int"  # version 7 added formats beyond int
    assert WeightOnly().version == 7 and WeightOnly().compute_dtype == "auto"
    with pytest.raises(FormatVersionError, match="newer"):
        config_from_dict(WeightOnly().to_dict() | {"version": 8})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "magic"}, "unknown weight method"),
        ({"damp": -0.1}, "damp must be"),
        ({"awq_grid": 0}, "awq_grid must be"),
        ({"compute_dtype": "float16"}, "compute_dtype must be one of"),
    ],
    ids=["method", "damp", "grid", "compute"],
)
def test_weight_only_validation(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        WeightOnly(**kwargs)


def test_smoothquant_alpha_validated():
    with pytest.raises(LowbitError, match="alpha must be in"):
        SmoothQuant(alpha=1.5)


def test_parse_scheme_with_method():
    assert parse_scheme("w4g128", "gptq") == WeightOnly(group_size=128, method="gptq")
    assert parse_scheme("w8a8", "smoothquant") == SmoothQuant()
    assert parse_scheme("w8a8", "rtn") == lowbit.Int8Dynamic()
    for scheme, method in (("w8a8", "gptq"), ("w4g128", "smoothquant"), ("w8a8-static", "smoothquant")):
        with pytest.raises(LowbitError, match="does not apply to scheme"):
            parse_scheme(scheme, method)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [WeightOnly(method="gptq"), WeightOnly(method="awq"), SmoothQuant()])
def test_methods_with_data_need_calib(config):
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_(tiny_llama(), config)


def test_unknown_architecture_lists_known():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(LowbitError, match=r"does not know model_type 'gpt2'; known: llama, .*qwen2.*gemma"):
        quantize_(model, WeightOnly(method="gptq"), _calib(vocab=32))
    with pytest.raises(LowbitError, match="model without a Hugging Face config"):
        architecture(None)


def test_bad_and_empty_calibration():
    with pytest.raises(LowbitError, match=r"calibration batch 0 .* does not fit the model"):
        quantize_(tiny_llama(), WeightOnly(method="gptq"), [torch.zeros(1, 4, 3)])
    with pytest.raises(LowbitError, match="calibration set is empty"):
        quantize_(tiny_llama(), WeightOnly(method="gptq"), [])


# ---- the pipeline against direct quantization --------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_calibration_free_through_pipeline_equals_quantize(method):
    direct, piped = tiny_llama(), tiny_llama()
    s1 = quantize_(direct, WeightOnly(**W4, method=method))
    s2 = quantize_sequential(piped, WeightOnly(**W4, method=method), None, Selector(), False)
    assert s1.quantized == s2.quantized and s1.tied == s2.tied
    a, b = direct.state_dict(), piped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_beats_rtn_on_calibration_data():
    base = tiny_llama(hidden=64, intermediate=128)
    calib = _calib(n=8, length=32)
    ids = torch.cat(calib)
    errs = {}
    for method in ("rtn", "gptq", "awq+gptq"):
        q = copy.deepcopy(base)
        quantize_(q, WeightOnly(**W4, method=method, quantize_embeddings=False), calib)
        errs[method] = _rel_err(q, base, ids)
    # measured: rtn 5.7e-3, gptq 3.8e-3, awq+gptq 3.9e-3 (relative logit MSE)
    assert errs["gptq"] < 0.8 * errs["rtn"] and errs["awq+gptq"] < 0.8 * errs["rtn"], errs


def test_compute_dtype_resolves_by_hardware(monkeypatch):
    from lowbit.transforms.block import compute_dtype

    assert compute_dtype("float32") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert compute_dtype("auto", "cpu") == torch.bfloat16
    assert compute_dtype("auto", "meta") == torch.float32


def test_compute_context_restores_the_matmul_precision():
    from lowbit.transforms.block import _compute

    block = tiny_llama().model.layers[0]
    flag = torch.backends.mkldnn.matmul
    before = flag.fp32_precision
    with _compute(block, "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and flag.fp32_precision == "bf16"
    assert flag.fp32_precision == before and not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError), _compute(block, "bfloat16"):
        raise RuntimeError
    assert flag.fp32_precision == before
    with _compute(block, "float32"):
        assert not torch.is_autocast_enabled("cpu") and flag.fp32_precision == before


def test_bfloat16_calibration_forwards_stay_close():
    base = tiny_llama(hidden=64, intermediate=128)
    calib = _calib(n=8, length=32)
    ids = torch.cat(calib)
    errs = {}
    for dtype in ("float32", "bfloat16"):
        q = copy.deepcopy(base)
        config = WeightOnly(**W4, method="gptq", quantize_embeddings=False, compute_dtype=dtype)
        s = quantize_(q, config, calib)
        assert s.compute_dtype == dtype and f"calibration forwards in {dtype}" in str(s)
        errs[dtype] = _rel_err(q, base, ids)
    assert errs["bfloat16"] < 1.1 * errs["float32"], errs  # measured: 3.782e-3 against 3.784e-3


def test_awq_and_smoothquant_stay_close():
    base, calib = tiny_llama(), _calib()
    ids = torch.cat(calib)
    awq = copy.deepcopy(base)
    s = quantize_(awq, WeightOnly(**W4, method="awq"), calib)
    producers = ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")  # v -> o: GQA, skipped
    assert set(s.scaled) == {f"model.layers.{i}.{p}" for i in range(2) for p in producers}
    assert _rel_err(awq, base, ids) < 0.02  # measured 8e-3 (w4 g16 on 32 channels)
    sq = copy.deepcopy(base)
    s = quantize_(sq, SmoothQuant(), calib)
    assert isinstance(sq.model.layers[0].mlp.down_proj, lowbit.QDynamicLinear)
    assert isinstance(sq.lm_head, lowbit.QDynamicLinear) and s.tied == {"lm_head": "model.embed_tokens"}
    assert _rel_err(sq, base, ids) < 1e-3  # measured 6e-5


def test_exclusions_and_uncalibrated_linears():
    base = tiny_llama()
    for block in base.model.layers:
        block.mlp.unused = nn.Linear(32, 32)  # never called: sees no calibration token
    q = copy.deepcopy(base)
    s = quantize_(q, WeightOnly(**W4, method="awq+gptq"), _calib(), exclude=["*.down_proj"])
    assert s.uncalibrated == {f"model.layers.{i}.mlp.unused": "hqq" for i in range(2)}
    assert type(q.model.layers[0].mlp.down_proj) is nn.Linear
    assert "model.layers.0.mlp.up_proj" not in s.scaled  # its consumer is excluded
    assert isinstance(q.model.layers[1].mlp.unused, lowbit.QLinear)
    assert "no calibration tokens: model.layers.0.mlp.unused (hqq)" in str(s)


# ---- scale folding keeps the float function ----------------------------------------------------


def _tiny(kind: str, heads: int, kv_heads: int, layers: int = 1):
    from transformers import AutoConfig, AutoModelForCausalLM

    types = ["sliding_attention", "full_attention"][-layers:]
    extra = {"layer_types": types, "sliding_window": 4} if kind == "gemma2" else {}
    cfg = AutoConfig.for_model(
        kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32 // heads, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 1.5)  # Gemma's norms start at 0 (that is, x * 1)
            elif n.endswith("bias"):
                p.normal_()
    return model


@pytest.mark.parametrize(
    "kind,heads,kv_heads,n_maps",
    [("llama", 4, 2, 3), ("llama", 4, 4, 4), ("qwen2", 4, 4, 4), ("gemma", 4, 1, 3), ("gemma2", 2, 2, 4)],
    ids=["llama-gqa", "llama-mha", "qwen2-bias", "gemma", "gemma2"],
)
def test_fold_scales_is_an_equivalence(kind, heads, kv_heads, n_maps):
    model = _tiny(kind, heads, kv_heads)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        arch = architecture(model.config)
        maps = resolve(model.model.layers[0], arch)
        assert len(maps) == n_maps  # v -> o only without grouped-query attention
        g = torch.Generator().manual_seed(1)
        for _, producer, consumers in maps:
            s = torch.rand(consumers[0][1].in_features, generator=g) * 3 + 0.25
            fold_scales(producer, [c for _, c in consumers], s, arch.norm_offset)
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()  # measured <= 3.7e-7 relative


@pytest.mark.slow
def test_gptq_smollm2_beats_rtn(smollm2):
    from lowbit.data import calib_batches, eval_tokens
    from lowbit.eval.perplexity import perplexity

    model, tok = smollm2
    tokens = eval_tokens(tok, 4096)
    ppl = {}
    for method, calib in (("rtn", None), ("gptq", calib_batches(tok, 16, 512))):
        q = copy.deepcopy(model)
        config = WeightOnly(bits=4, group_size=128, embedding_bits=8, embedding_group_size=0, method=method)
        quantize_(q, config, calib)
        ppl[method] = perplexity(q, tokens, window=512)
    # measured (4096 tokens, 16 x 512 calibration tokens): fp32 20.91, rtn 27.86, gptq 24.83
    assert ppl["gptq"] < 0.93 * ppl["rtn"], ppl


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_other_architectures_through_the_pipeline(kind):
    base = _tiny(kind, 4, 4, layers=2)  # gemma2: a sliding-window block (window 4) then a full one
    calib = _calib(n=4, length=16)
    q = copy.deepcopy(base)
    s = quantize_(q, WeightOnly(**W4, method="awq+gptq", quantize_embeddings=False), calib)
    assert len(s.scaled) == 8 and len(s.quantized) == 15  # 4 maps per block (v -> o too), 7 + 7 + head
    assert _rel_err(q, base, torch.cat(calib)) < 0.03  # measured 7e-3 (qwen2), 1.4e-2 (gemma2)


def test_row_chunks_round_the_same(monkeypatch):
    from lowbit.transforms import swap

    whole, chunked = tiny_llama(), tiny_llama()
    quantize_(whole, WeightOnly(**W4))
    monkeypatch.setattr(swap, "CHUNK_ROWS", 7)  # 64-row embedding in 10 chunks
    quantize_(chunked, WeightOnly(**W4))
    a, b = whole.state_dict(), chunked.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _block0_stats(calib, **config):
    from lowbit.transforms import block as blk
    from lowbit.transforms import sequential as seq

    base = tiny_llama(hidden=64, intermediate=128)
    cap = seq.capture(base, "model.layers", calib)
    block = base.model.layers[0]
    targets = blk._linears(block, "model.layers.0", lambda n: True)
    groups = blk._input_groups(block, architecture(base.config), targets)
    plan = seq.block_plan(WeightOnly(**W4, method="gptq", **config))
    return block, cap, targets, groups, plan


def test_gather_stops_early_with_the_same_statistics():
    from lowbit.transforms import block as blk

    calib = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (16, 20, 24)]
    block, cap, targets, groups, plan = _block0_stats(calib)  # shapes differ: three forwards
    seen = {lead: [] for lead in groups}
    calls = []

    def keep(lead):
        return lambda m, a, o: seen[lead].append(a[0].reshape(-1, a[0].shape[-1]))

    hooks = [block.get_submodule(lead).register_forward_hook(keep(lead)) for lead in groups]
    with torch.no_grad():
        for h, kw in zip(cap.hidden, cap.kwargs[0], strict=True):
            block(h, **kw)
    for h in hooks:
        h.remove()
    hook = block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    stats = blk.gather(block, groups, plan, cap.hidden, cap.kwargs[0])
    hook.remove()
    assert len(calls) == 1  # the last lead's product ran for the first batch only
    assert list(stats) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    for lead, xs in seen.items():
        x = torch.cat(xs)
        torch.testing.assert_close(stats[lead].hessian, 2 / x.shape[0] * x.t() @ x)


def test_stacked_gptq_gives_each_linear_its_own_result():
    from lowbit.transforms import block as blk
    from lowbit.transforms import block_round

    block, cap, targets, groups, plan = _block0_stats(_calib(n=4, length=16))
    stats = blk.gather(block, groups, plan, cap.hidden, cap.kwargs[0])
    mods = dict(targets)
    for lead, names in groups.items():
        if len(names) < 2:
            continue
        stacked = block_round.round_group(names, mods, stats[lead], plan, "model.layers.0", {})
        assert list(stacked) == names
        for name, qt in stacked.items():
            alone, _ = block_round.round_weight(
                mods[name].weight.detach(), stats[lead], plan, plan.spec, name
            )
            assert (qt.codes != alone.codes).float().mean() < 1e-3  # measured: equal
            torch.testing.assert_close(qt.scale, alone.scale)
            torch.testing.assert_close(qt.zero_point, alone.zero_point)


def _quantized_block0(true_sequential: bool):
    from lowbit.transforms import block as blk

    calib = _calib(n=4, length=16)
    opts = {"true_sequential": true_sequential, "compute_dtype": "float32"}  # exact comparisons below
    block, cap, targets, groups, plan = _block0_stats(calib, **opts)
    floats = {n: m.weight.detach().clone() for n, m in targets}
    arch = architecture(tiny_llama(hidden=64, intermediate=128).config)
    blk.quantize_block(block, "model.layers.0", plan, arch, lambda n: True, cap.hidden, cap.kwargs[0], False)
    return block, cap, groups, plan, floats


def test_true_sequential_takes_each_hessian_from_the_block_quantized_so_far():
    from lowbit.transforms import block as blk
    from lowbit.transforms import block_round

    seq_block, cap, groups, plan, floats = _quantized_block0(True)
    par_block = _quantized_block0(False)[0]
    state = lambda b, name: b.get_submodule(name).state_dict()  # noqa: E731
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert all(same(state(seq_block, n), state(par_block, n)) for n in groups["self_attn.q_proj"])
    assert not same(state(seq_block, "self_attn.o_proj"), state(par_block, "self_attn.o_proj"))
    # down_proj, rounded last, saw the inputs the finished block gives it
    st = blk.gather(seq_block, {"mlp.down_proj": ["mlp.down_proj"]}, plan, cap.hidden, cap.kwargs[0])
    qt, _ = block_round.round_weight(floats["mlp.down_proj"], st["mlp.down_proj"], plan, plan.spec, "down")
    q = plan.qcls.from_float(torch.nn.Linear(*reversed(floats["mlp.down_proj"].shape), bias=False), plan.spec)
    q.set_weight(qt)
    assert same(q.state_dict(), state(seq_block, "mlp.down_proj"))
