"""perplexity: equals a hand-written cross-entropy, independent windows, input validation, real SmolLM2."""

import math
import time

import pytest
import torch

from lowbit import LowbitError
from lowbit.eval.perplexity import perplexity
from support import tiny_llama


def _reference(model, tokens, window):
    """exp(mean NLL) by hand: float64 log-softmax, one window at a time, ragged tail dropped."""
    nll, count = 0.0, 0
    for start in range(0, tokens.numel() - window + 1, window):
        ids = tokens[start : start + window]
        with torch.no_grad():
            logits = model(ids[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        for t in range(window - 1):
            nll -= logp[t, ids[t + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=100, attention_dropout=0.5)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (300,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("window,batch_size", [(64, 1), (64, 3), (50, 4), (300, 2)])
def test_matches_hand_computed_cross_entropy(model, tokens, window, batch_size):
    ppl = perplexity(model, tokens, window=window, batch_size=batch_size)
    assert ppl == pytest.approx(_reference(model, tokens, window), rel=1e-6)
    assert 50 < ppl < 200  # random weights: close to the vocabulary size


def test_ragged_tail_ignored_and_windows_independent(model, tokens):
    full = perplexity(model, tokens[:256], window=64)
    assert perplexity(model, tokens[:300], window=64) == full
    a, b = perplexity(model, tokens[:128], window=64), perplexity(model, tokens[128:256], window=64)
    assert math.log(full) == pytest.approx((math.log(a) + math.log(b)) / 2, rel=1e-9)


def test_restores_training_mode_and_progress(model, tokens, capsys):
    model.train()
    try:
        ppl = perplexity(model, tokens, window=64, progress=True)
        assert model.training
    finally:
        model.eval()
    assert ppl == pytest.approx(perplexity(model, tokens, window=64), rel=1e-9)  # dropout off while scoring
    assert "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad,kwargs,match",
    [
        (torch.zeros(2, 64, dtype=torch.long), {}, r"1-D LongTensor, got \(2, 64\)"),
        (torch.zeros(63, dtype=torch.long), {"window": 64}, "at least one full window of 64 tokens, got 63"),
        (torch.zeros(64), {"window": 64}, "integer token ids"),
        (torch.zeros(64, dtype=torch.long), {"window": 1}, "window must be an integer >= 2"),
        (torch.zeros(64, dtype=torch.long), {"window": 64, "batch_size": 0}, "batch_size must be"),
        ([1, 2, 3], {}, "1-D LongTensor, got list"),
    ],
)
def test_validation(model, bad, kwargs, match):
    with pytest.raises(LowbitError, match=match):
        perplexity(model, bad, **kwargs)


@pytest.mark.slow
def test_smollm2_fp32_perplexity(smollm2):
    from lowbit.data import eval_tokens

    model, tok = smollm2
    tokens = eval_tokens(tok, 8192)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens, window=512)
    seconds = time.perf_counter() - t0
    print(f"\nSmolLM2-135M fp32 perplexity on 8192 eval tokens (window 512): {ppl:.3f} in {seconds:.1f} s")
    assert math.isfinite(ppl) and 5 < ppl < 60


def test_window_nlls_sum_to_the_perplexity_and_interval_brackets_it(model, tokens):
    from lowbit.eval.perplexity import perplexity_interval, window_nlls

    windows = tokens[:250].view(5, 50)
    nlls = window_nlls(model, windows, batch_size=2)
    assert nlls.shape == (5,) and nlls.dtype == torch.float64
    ppl = perplexity(model, tokens[:250], window=50)
    assert math.exp(nlls.sum().item() / (5 * 49)) == pytest.approx(ppl, rel=1e-12)
    lo, hi = perplexity_interval(nlls, 50, bootstrap=500)
    assert lo <= ppl <= hi and lo < hi
    assert perplexity_interval(nlls, 50, bootstrap=500) == (lo, hi)  # seeded
    same = torch.full((4,), 49 * math.log(30.0), dtype=torch.float64)
    assert perplexity_interval(same, 50) == pytest.approx((30.0, 30.0))
    with pytest.raises(LowbitError, match="non-empty 1-D"):
        perplexity_interval(torch.zeros(0), 50)
