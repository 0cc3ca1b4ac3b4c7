"""Token tensors for evaluation and calibration, cut from the fixed Wikipedia split (``lowbit.data.wiki``).

Each part is tokenized as one text, its articles joined with ``"\\n\\n"``, without special tokens.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.data.wiki import calib_articles, eval_articles

SEPARATOR = "\n\n"


def tokenize(tokenizer: Any, articles: list[str]) -> torch.Tensor:
    """LongTensor (n,): ``articles`` joined with ``SEPARATOR``, tokenized without special tokens."""
    ids = tokenizer(SEPARATOR.join(articles), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LowbitError(f"{name} must be a positive integer, got {value!r}")


PER_ARTICLE = 1024


def _openings(tokenizer: Any, per_article: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index in ``eval_articles()``, its first ``per_article`` tokens), article by article, lazily."""
    for i, article in enumerate(eval_articles()):
        yield i, tokenize(tokenizer, [article])[:per_article]


def eval_tokens(tokenizer: Any, n_tokens: int = 8192, per_article: int = PER_ARTICLE) -> torch.Tensor:
    """LongTensor (n_tokens,): the opening tokens of held-out articles, at most ``per_article`` each.

    Articles are tokenized one by one (no special tokens) and taken in order, so the default 8,192
    tokens span 8 articles rather than one long one; with window 512 each window lies in one article.
    """
    _check_positive("n_tokens", n_tokens)
    _check_positive("per_article", per_article)
    parts, have = [], 0
    for _, part in _openings(tokenizer, per_article):
        if have >= n_tokens:
            break
        parts.append(part)
        have += part.numel()
    if have < n_tokens:
        raise LowbitError(
            f"the evaluation text has only {have} tokens with this tokenizer at per_article={per_article}; "
            f"asked for n_tokens={n_tokens}"
        )
    return torch.cat(parts)[:n_tokens].clone()


def eval_windows(
    tokenizer: Any, window: int = 512, per_article: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every held-out article's opening ``per_article`` tokens cut into full windows (each article's ragged
    tail dropped): LongTensor ``(n, window)`` and each window's article, LongTensor ``(n,)`` (its index in
    ``eval_articles()``). For per-article scores (``lowbit.eval.audit``); articles shorter than one window
    give none."""
    _check_positive("window", window)
    _check_positive("per_article", per_article)
    rows, owner = [], []
    for i, part in _openings(tokenizer, per_article):
        n = part.numel() // window
        if n:
            rows.append(part[: n * window].view(n, window))
            owner += [i] * n
    if not rows:
        raise LowbitError(f"no held-out article has {window} tokens with this tokenizer")
    return torch.cat(rows), torch.tensor(owner, dtype=torch.long)


def calib_batches(
    tokenizer: Any, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> list[torch.Tensor]:
    """``n_samples`` LongTensors (1, seq_len) from the calibration text, disjoint from ``eval_tokens``.

    The text is cut into non-overlapping windows of ``seq_len`` tokens (ragged tail dropped) and
    ``n_samples`` of them are drawn without replacement by ``random.Random(seed)``: the same seed
    and tokenizer give the same samples. If there are fewer windows than asked for, a warning says
    so and all windows are returned (in seeded order).
    """
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    tokens = tokenize(tokenizer, calib_articles())
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise LowbitError(
            f"the calibration text has only {tokens.numel()} tokens, fewer than seq_len={seq_len}"
        )
    if n_samples > n_windows:
        warnings.warn(
            f"the calibration text has {tokens.numel()} tokens = {n_windows} samples of seq_len={seq_len}; "
            f"asked for n_samples={n_samples} ({n_samples * seq_len} tokens); returning {n_windows}",
            stacklevel=2,
        )
        n_samples = n_windows
    starts = random.Random(seed).sample(range(n_windows), n_samples)
    return [tokens[s * seq_len : (s + 1) * seq_len].clone().unsqueeze(0) for s in starts]
