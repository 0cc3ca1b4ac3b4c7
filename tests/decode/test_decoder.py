"""lowbit.decode: the fast path's greedy tokens equal the plain Hugging Face forward's; bad input."""

import copy
import warnings

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lowbit
from lowbit.core.errors import LowbitError
from lowbit.decode import Decoder, Unsupported
from lowbit.decode.layers import Fused, NativeLinear
from lowbit.nn import QLinear

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
CONFIGS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2)),  # q/k/v biases
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16)),
}


def _model(family: str, quantized: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = CONFIGS[family]().eval()
    if quantized:
        lowbit.quantize_(m, lowbit.WeightOnly(bits=4, group_size=32))
    return m


def _q(layer):
    """The ``QLinear`` behind a decode-path layer (``NativeLinear`` wraps one)."""
    return layer.layer if isinstance(layer, NativeLinear) else layer


def _hf(model, ids, new):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


IDS = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("native", [True, False], ids=["native", "eager"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w4g32"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_tokens_equal_plain_forward(family, quantized, native):
    m = _model(family, quantized)
    ref = _hf(m, IDS, 12)
    dec = Decoder(m, cache_len=32, compile=False, native=native)
    assert dec.engine == ("native" if native and quantized else "eager")  # float linears: no C step
    assert torch.equal(dec.generate(IDS, 12), ref)


@pytest.mark.parametrize("native", [True, False], ids=["native", "eager"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_step_logits_match_full_forward(family, native):
    m = _model(family, True)
    seq = _hf(m, IDS, 6)
    with torch.no_grad():
        full = m(seq).logits[:, -1]
    dec = Decoder(m, cache_len=16, compile=False, native=native)
    dec.prefill(seq[:, :-1])
    torch.testing.assert_close(dec.step(seq[:, -1:]), full, rtol=1e-5, atol=1e-5)


def test_native_step_refuses_what_it_cannot_run():
    m = _model("llama", False)
    assert "linear" in Decoder(m, compile=False).native_reason  # float linears
    lowbit.quantize_(m, lowbit.WeightOnly(bits=4, group_size=32))
    assert Decoder(m, compile=False).native_reason is None
    assert Decoder(m, compile=False, native=False).engine == "eager"
    m.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-3
    assert "epsilon" in Decoder(m, compile=False).native_reason
    m.model.layers[1].post_attention_layernorm.variance_epsilon = m.model.norm.variance_epsilon
    m.model.layers[0].mlp.act_fn = torch.nn.ReLU()
    assert "activation" in Decoder(m, compile=False).native_reason


@pytest.mark.parametrize("variant", ["nobf16", "generic"])
def test_native_step_on_other_builds_equals_plain_forward(monkeypatch, variant):
    from lowbit.kernels import native

    lib = native.library(variant)
    if lib is None:
        pytest.skip(f"no {variant} build of the C kernels here")
    m = _model("qwen2", True)
    ref = _hf(m, IDS, 10)
    monkeypatch.setattr(native, "library", lambda variant="native": lib)
    dec = Decoder(m, cache_len=24, compile=False)
    assert dec.engine == "native" and torch.equal(dec.generate(IDS, 10), ref)


def test_native_step_refuses_a_position_outside_its_cache():
    dec = Decoder(_model("llama", True), cache_len=8, compile=False)
    dec.prefill(IDS[:, :4])
    with pytest.raises(LowbitError, match="positions 7..8"):
        dec._native(torch.zeros(2, 64), 7)
    with pytest.raises(LowbitError, match="float32"):
        dec._native(torch.zeros(64), 4)


@pytest.mark.parametrize(
    "config",
    [lowbit.WeightOnly(bits=8, group_size=None), lowbit.WeightOnly(format="nf4", group_size=32)],
    ids=["w8", "nf4g32"],
)
def test_other_formats_equal_plain_forward(config):
    torch.manual_seed(0)
    m = CONFIGS["llama"]().eval()
    lowbit.quantize_(m, config)
    assert torch.equal(Decoder(m, cache_len=32, compile=False).generate(IDS, 8), _hf(m, IDS, 8))


def test_compiled_step_equals_plain_forward():
    m = _model("llama", True)
    ref = _hf(m, IDS, 10)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowbit: torch.compile failed")  # no eager fallback
        dec = Decoder(m, cache_len=24, compile=True, native=False)
        assert dec.engine == "compiled"
        out = dec.generate(IDS, 10)
    assert torch.equal(out, ref)


def test_qkv_and_gate_up_are_one_call_over_the_model_buffers():
    m = _model("llama", True)
    dec = Decoder(m, compile=False)
    block = dec.net.blocks[0]
    assert len(block.qkv.parts) == 1 and len(block.gate_up.parts) == 1
    attn = m.model.layers[0].self_attn
    assert _q(block.qkv.parts[0]).rows == attn.q_proj.rows + attn.k_proj.rows + attn.v_proj.rows
    assert _q(block.o).qweight is attn.o_proj.qweight  # single layers are views, not copies
    x = torch.randn(3, 64)
    with torch.no_grad():
        for got, layer in zip(block.qkv(x), (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
            assert torch.equal(got, layer(x))


def test_mixed_specs_run_part_by_part():
    m = _model("llama", False)
    attn = m.model.layers[0].self_attn
    lowbit.quantize_(attn, lowbit.WeightOnly(bits=8, group_size=None), include=["q_proj"])
    parts = Fused([attn.q_proj, attn.k_proj, attn.v_proj]).parts
    assert len(parts) == 3 and type(_q(parts[0])) is QLinear and parts[1] is attn.k_proj


def test_int8_dot_stays_close():
    m = _model("llama", True)
    plain = Decoder(m, cache_len=32, compile=False)
    fast = Decoder(m, cache_len=32, compile=False, dot="int8")
    if _q(fast.net.blocks[0].qkv.parts[0]).backend != "cpu_native_a8":
        pytest.skip("no int8 dot-product kernel on this CPU (AVX512-VNNI)")
    prompt = torch.arange(20)[None] % 256
    a, b = plain.prefill(prompt), fast.prefill(prompt)  # int8 activations at every row of the prompt
    for x, y in zip(plain.net.k_cache, fast.net.k_cache, strict=True):
        assert (x - y).abs().max() < 0.05 * x.abs().max()
    for _ in range(3):  # the LM head and every decode step: int8 activations
        assert (a - b).abs().max() < 0.05 * a.abs().max()
        tok = a.argmax(-1, keepdim=True)
        a, b = plain.step(tok), fast.step(tok)


def test_unknown_architecture_falls_back_with_one_warning():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(Unsupported, match="gpt2"):
        Decoder(m)
    with pytest.warns(RuntimeWarning, match="gpt2") as rec:
        out = lowbit.generate(m, IDS, 5, eos_token_id=None)
    assert len([w for w in rec if "fast decode" in str(w.message)]) == 1
    assert torch.equal(out, _hf(m, IDS, 5))


def test_prompt_longer_than_cache_grows_it():
    m = _model("llama", True)
    dec = Decoder(m, cache_len=4, compile=False)
    out = dec.generate(IDS, 8)
    assert dec.cache_len >= IDS.shape[1] + 8
    assert torch.equal(out, _hf(m, IDS, 8))


def test_past_max_positions_is_refused():
    m = _model("llama", True)
    m.config.max_position_embeddings = 12
    dec = Decoder(m, cache_len=64, compile=False)
    assert dec.cache_len == 12
    with pytest.raises(LowbitError, match="max_position_embeddings"):
        dec.generate(IDS, 8)


def test_failing_compile_falls_back_once(monkeypatch):
    m = _model("llama", True)
    ref = _hf(m, IDS, 6)

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here") as rec:
        out = Decoder(m, cache_len=16, compile=True, native=False).generate(IDS, 6)
    assert len(rec) == 1 and torch.equal(out, ref)


def test_bad_input():
    m = _model("llama", True)
    dec = Decoder(m, compile=False)
    with pytest.raises(LowbitError, match="prefill"):
        dec.step(torch.tensor([[1]]))
    with pytest.raises(LowbitError, match="batch 1"):
        dec.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(LowbitError, match="integer"):
        dec.prefill(torch.zeros(1, 3))
    with pytest.raises(LowbitError, match="dot"):
        Decoder(m, dot="fp8")


def test_eos_stops():
    m = _model("llama", False)
    ref = _hf(m, IDS, 6)
    eos = int(ref[0, IDS.shape[1] + 2])
    out = lowbit.generate(m, IDS, 6, eos_token_id=eos, compile=False)
    assert out.shape[1] <= IDS.shape[1] + 3 and int(out[0, -1]) == eos


def test_does_not_change_the_model():
    m = _model("llama", True)
    before = copy.deepcopy(m.state_dict())
    Decoder(m, compile=False, dot="int8").generate(IDS, 4)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(q.backend is None for q in m.modules() if isinstance(q, QLinear))


@pytest.mark.slow
def test_smollm2_w4g128_tokens_equal_plain_forward(smollm2):
    model, tok = smollm2
    m = copy.deepcopy(model)
    lowbit.quantize_(m, lowbit.WeightOnly(bits=4, group_size=128))
    ids = torch.tensor([tok.encode("The history of the city of Paris begins")])
    ref = _hf(m, ids, 24)
    for kw in ({}, {"native": False, "compile": False}, {"native": False}):  # native, eager, compiled
        assert torch.equal(Decoder(m, cache_len=64, **kw).generate(ids, 24), ref)


def test_many_decoders_each_keep_a_compiled_step():
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for i in range(9):  # more than torch.compile's 8 recompilations of one code object
        torch.manual_seed(i)
        m = CONFIGS["llama"]().eval()
        Decoder(m, cache_len=16).generate(IDS[:, :4], 2)
    assert counters["stats"]["unique_graphs"] - before == 9
