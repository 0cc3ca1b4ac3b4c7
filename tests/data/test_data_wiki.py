"""Wikipedia text: clean articles, a fixed disjoint split, eval tokens and calibration samples."""

import zlib

import pytest
import torch

from lowbit import LowbitError
from lowbit.data import EVAL_EVERY, calib_articles, calib_batches, eval_articles, eval_tokens, wiki_articles
from lowbit.data.tokens import PER_ARTICLE, tokenize
from lowbit.data.wiki import MIN_CHARS, clean_wiki


class WordTokenizer:
    """Stand-in for a Hugging Face tokenizer: one id per whitespace-separated word (crc32 % 50000)."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [zlib.crc32(w.encode()) % 50000 for w in text.split()]}


def test_articles_are_plain_text_and_deterministic():
    arts = wiki_articles()
    assert 90 <= len(arts) <= 110
    assert arts == wiki_articles()
    assert all(len(a) >= MIN_CHARS for a in arts)
    assert arts[0].startswith("Anarchism is a political philosophy")
    for a in arts:
        assert not a.lower().startswith("#redirect")
        for markup in ("[[", "]]", "{{", "''", "==", "<ref"):
            assert markup not in a


def test_clean_wiki():
    markup = "'''Bold''' and [[Link|text]].\n\n\n\n== Heading ==\n*\nBody {{cite|x}}"
    assert clean_wiki(markup) == "Bold and text.\n\nHeading\n\nBody"


def test_split_is_fixed_and_disjoint():
    arts, ev, cal = wiki_articles(), eval_articles(), calib_articles()
    assert ev == arts[::EVAL_EVERY]
    assert len(ev) + len(cal) == len(arts)
    assert not set(ev) & set(cal)
    assert set(ev) | set(cal) == set(arts)
    assert len(ev) >= 20


def test_eval_tokens_length_and_determinism():
    tok = WordTokenizer()
    t = eval_tokens(tok, 1000)
    assert t.shape == (1000,) and t.dtype == torch.long
    assert torch.equal(t, eval_tokens(tok, 1000))
    assert torch.equal(eval_tokens(tok, 5000)[:1000], t)
    per = [a.split()[:PER_ARTICLE] for a in eval_articles()]
    words = [w for ws in per for w in ws][:1000]
    assert t.tolist() == [zlib.crc32(w.encode()) % 50000 for w in words]
    spread = eval_tokens(tok, 100, per_article=10)  # 10 articles, 10 tokens each
    assert spread.tolist()[10:20] == [zlib.crc32(w.encode()) % 50000 for w in per[1][:10]]


def test_eval_tokens_too_many():
    available = sum(min(len(a.split()), PER_ARTICLE) for a in eval_articles())
    with pytest.raises(LowbitError, match=f"only {available} tokens"):
        eval_tokens(WordTokenizer(), available + 1)
    with pytest.raises(LowbitError, match="n_tokens must be a positive integer"):
        eval_tokens(WordTokenizer(), 0)


def test_calib_batches_shape_determinism_and_source():
    tok = WordTokenizer()
    batches = calib_batches(tok, n_samples=16, seq_len=64, seed=0)
    assert len(batches) == 16
    assert all(b.shape == (1, 64) and b.dtype == torch.long for b in batches)
    again = calib_batches(tok, n_samples=16, seq_len=64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = calib_batches(tok, n_samples=16, seq_len=64, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))
    calib = tokenize(tok, calib_articles()).view(-1)
    windows = {tuple(w.tolist()) for w in calib[: calib.numel() // 64 * 64].view(-1, 64)}
    assert len({tuple(b[0].tolist()) for b in batches}) == 16  # no sample drawn twice
    assert all(tuple(b[0].tolist()) in windows for b in batches)


def test_calib_warns_when_asking_too_much():
    tok = WordTokenizer()
    total = tokenize(tok, calib_articles()).numel()
    seq_len = 4096
    n_windows = total // seq_len
    with pytest.warns(UserWarning, match=f"has {total} tokens = {n_windows} samples of seq_len={seq_len}"):
        batches = calib_batches(tok, n_samples=10_000, seq_len=seq_len)
    assert len(batches) == n_windows
    with pytest.raises(LowbitError, match="fewer than seq_len"):
        calib_batches(tok, n_samples=1, seq_len=total + 1)


@pytest.mark.slow
def test_real_tokenizer(smollm2):
    _, tok = smollm2
    t = eval_tokens(tok, 8192)
    assert t.shape == (8192,) and int(t.max()) < len(tok)
    assert torch.equal(t, eval_tokens(tok, 8192))
    batches = calib_batches(tok, n_samples=128, seq_len=512)
    assert len(batches) == 128 and all(b.shape == (1, 512) for b in batches)
    assert tok.decode(t[:3]).startswith("Anarchism")


def test_eval_windows_one_article_per_window():
    from lowbit.data import eval_windows

    tok = WordTokenizer()
    windows, article = eval_windows(tok, window=100, per_article=250)
    per = [a.split()[:250] for a in eval_articles()]
    assert windows.shape == (len(article), 100) and windows.dtype == torch.long
    assert article.tolist() == [i for i, ws in enumerate(per) for _ in range(len(ws) // 100)]
    first = article.tolist().index(3)  # each window is the article's own tokens, tails dropped
    assert windows[first].tolist() == [zlib.crc32(w.encode()) % 50000 for w in per[3][:100]]
    with pytest.raises(LowbitError, match="no held-out article has 10000000 tokens"):
        eval_windows(tok, window=10_000_000, per_article=10_000_000)
    with pytest.raises(LowbitError, match="window must be a positive integer"):
        eval_windows(tok, window=0)
