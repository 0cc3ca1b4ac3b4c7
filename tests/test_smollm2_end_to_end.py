"""The real SmolLM2-135M through lowbit: an independent RTN agrees, checkpoints shrink as promised.

Uses the session fixture ``smollm2`` (tests/conftest.py). Marked slow: about a minute each.
"""

import copy

import pytest
import torch

import lowbit
from lowbit import WeightOnly, parse_scheme, quantize_
from lowbit.data import eval_tokens
from lowbit.eval.perplexity import perplexity
from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes

pytestmark = pytest.mark.slow
N_TOKENS, WINDOW = 8192, 512


def independent_rtn_(model, bits=4, group=64):
    """Reference RTN written separately from lowbit: asymmetric, integer zero point, per-group min/max,
    float32 scales, applied to every Linear and Embedding weight in place (fake-quantized floats)."""
    qmax = 2**bits - 1
    seen = set()
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear | torch.nn.Embedding) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        w = m.weight.data
        g = w.reshape(w.shape[0], -1, group)
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
        w.copy_(((q - zero) * scale).reshape(w.shape))


def test_rtn_w4g64_matches_independent_implementation(smollm2):
    model, tok = smollm2
    tokens = eval_tokens(tok, N_TOKENS)
    ref = copy.deepcopy(model)
    independent_rtn_(ref)
    ppl_ref = perplexity(ref, tokens, window=WINDOW)
    del ref
    q = copy.deepcopy(model)
    quantize_(q, WeightOnly(bits=4, group_size=64, symmetric=False))
    ppl_lowbit = perplexity(q, tokens, window=WINDOW)
    print(f"\nRTN w4g64 asym perplexity: lowbit {ppl_lowbit:.3f}, independent {ppl_ref:.3f}")
    assert abs(ppl_lowbit / ppl_ref - 1) < 0.01


@pytest.mark.parametrize("scheme,min_ratio", [("w8", 3.9), ("w4g128", 6.5)])
def test_whole_checkpoint_compression(smollm2, tmp_path, scheme, min_ratio):
    model, tok = smollm2
    fp32 = fp32_checkpoint_bytes(model)
    q = copy.deepcopy(model)
    quantize_(q, parse_scheme(scheme))
    lowbit.save(q, tmp_path / scheme, tokenizer=tok)
    ratio = fp32 / dir_bytes(tmp_path / scheme / "model.safetensors")
    print(f"\n{scheme}: {fp32 / 1e6:.1f} MB fp32 -> {ratio:.2f}x smaller")
    assert ratio >= min_ratio
    loaded = lowbit.load(tmp_path / scheme)
    ids = eval_tokens(tok, 64)[None]
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)
