"""Sentence-encoder measurements: word-similarity Spearman correlation, and agreement with reference
embeddings (cosine per row), e.g. a quantized encoder against its fp32 twin on the same texts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.core.errors import LowbitError, NonFiniteError
from lowbit.models.encoders import embed


def _check_pairs(pairs: Any) -> list[tuple[str, str, float]]:
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or len(pairs) < 2:
        raise LowbitError(
            f"pairs must be a list of at least 2 (word1, word2, score) triples, got {pairs!r:.80}"
        )
    out = []
    for i, p in enumerate(pairs):
        ok = isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 3
        if not ok or not all(isinstance(w, str) and w.strip() for w in p[:2]):
            raise LowbitError(f"pairs[{i}] must be (word1, word2, score) with non-empty words, got {p!r:.80}")
        if isinstance(p[2], bool) or not isinstance(p[2], (int, float)) or not math.isfinite(p[2]):
            raise LowbitError(f"pairs[{i}]: score must be a finite number, got {p[2]!r}")
        out.append((p[0], p[1], float(p[2])))
    if len({s for _, _, s in out}) < 2:
        raise LowbitError("all human scores in pairs are equal: Spearman correlation is undefined")
    return out


def word_similarity(
    model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str, float]], **embed_kw: Any
) -> dict:
    """Spearman correlation between the model's cosine similarity and human scores over word ``pairs``.

    Each distinct word is embedded once as a one-word text (``lowbit.models.encoders.embed``;
    ``embed_kw`` such as ``batch_size`` are passed on). Returns ``{"rho", "pvalue", "n"}``: ρ in [-1, 1]
    (scipy.stats.spearmanr, ties averaged; NaN with a scipy warning if all cosines are equal) and the
    number of pairs used (all of them).
    """
    pairs = _check_pairs(pairs)
    from scipy.stats import spearmanr

    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    vectors = embed(model, tokenizer, words, **embed_kw).double()  # (len(words), hidden)
    a = vectors[[index[p[0]] for p in pairs]]
    b = vectors[[index[p[1]] for p in pairs]]
    cos = F.cosine_similarity(a, b, dim=1).numpy()
    result = spearmanr(cos, [s for _, _, s in pairs])
    return {"rho": float(result.statistic), "pvalue": float(result.pvalue), "n": len(pairs)}


def _check_matrix(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        what = (
            f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        )
        raise LowbitError(f"{name} must be a 2-D float tensor (rows, hidden), got {what}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise LowbitError(f"{name} is empty: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{name} holds NaN or Inf")


def cosine_to_reference(emb: torch.Tensor, ref_emb: torch.Tensor) -> dict:
    """Cosine similarity of each row of ``emb`` (n, h) with the same row of ``ref_emb`` (n, h).

    Computed in float64 (a zero row has cosine 0). Returns ``{"mean", "min", "argmin", "n"}``: the mean
    and smallest row cosine, the index of that row, and the number of rows.
    """
    _check_matrix("emb", emb)
    _check_matrix("ref_emb", ref_emb)
    if emb.shape != ref_emb.shape:
        raise LowbitError(
            f"emb {tuple(emb.shape)} and ref_emb {tuple(ref_emb.shape)} must have the same shape"
        )
    cos = F.cosine_similarity(emb.detach().double().cpu(), ref_emb.detach().double().cpu(), dim=1, eps=1e-30)
    return {"mean": cos.mean().item(), "min": cos.min().item(), "argmin": int(cos.argmin()), "n": cos.numel()}
