"""Encoder evaluation: row cosine against reference embeddings, word-similarity Spearman correlation."""

import math

import pytest
import torch

from lowbit import LowbitError, NonFiniteError
from lowbit.data.text_pairs import simlex999, wordsim353
from lowbit.eval.embeddings import cosine_to_reference, word_similarity
from lowbit.models.encoders import load_encoder

PAIRS = [
    ("car", "automobile", 9.0),
    ("cat", "dog", 7.0),
    ("king", "queen", 8.0),
    ("car", "banana", 1.0),
    ("stone", "idea", 0.5),
    ("cup", "mug", 8.5),
]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm-l6", progress=False)


def test_cosine_to_reference_values():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert cosine_to_reference(ref, ref) == pytest.approx({"mean": 1.0, "min": 1.0, "argmin": 0, "n": 3})
    emb = torch.tensor([[1.0, 1.0], [0.0, 5.0], [0.0, 0.0]])  # cosines 1/sqrt(2), 1, 0 (zero row)
    r = cosine_to_reference(emb, ref)
    assert r["mean"] == pytest.approx((1 / math.sqrt(2) + 1) / 3, abs=1e-12)
    assert (r["min"], r["argmin"], r["n"]) == (0.0, 2, 3)
    assert cosine_to_reference(ref.half(), ref.double())["min"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "emb, ref, err, match",
    [
        (
            torch.ones(3, 4),
            torch.ones(3, 5),
            LowbitError,
            r"emb \(3, 4\) and ref_emb \(3, 5\) must have the same",
        ),
        (torch.ones(4), torch.ones(4), LowbitError, r"emb must be a 2-D float tensor .*shape \(4,\)"),
        (torch.ones(2, 2), torch.ones(2, 2, dtype=torch.long), LowbitError, "ref_emb must be a 2-D float"),
        ([[1.0]], torch.ones(1, 1), LowbitError, "got list"),
        (torch.ones(0, 4), torch.ones(0, 4), LowbitError, r"emb is empty: shape \(0, 4\)"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), NonFiniteError, "emb holds NaN or Inf"),
    ],
    ids=["shape", "1-D", "int", "list", "empty", "nan"],
)
def test_cosine_to_reference_errors(emb, ref, err, match):
    with pytest.raises(err, match=match):
        cosine_to_reference(emb, ref)


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([], "at least 2"),
        ([("a", "b", 1.0)], "at least 2"),
        ("cat dog 3", "at least 2"),
        (
            [("a", "b", 1.0), ("a", "", 2.0)],
            r"pairs\[1\] must be \(word1, word2, score\) with non-empty words",
        ),
        ([("a", "b", 1.0), ("a", "b")], r"pairs\[1\] must be"),
        ([("a", "b", 1.0), ("a", "c", "high")], r"pairs\[1\]: score must be a finite number, got 'high'"),
        ([("a", "b", 1.0), ("a", "c", float("nan"))], "finite number, got nan"),
        ([("a", "b", 3.0), ("a", "c", 3.0)], "all human scores in pairs are equal"),
    ],
    ids=["empty", "one", "str", "empty-word", "two-fields", "str-score", "nan-score", "constant"],
)
def test_word_similarity_errors(pairs, match):
    with pytest.raises(LowbitError, match=match):
        word_similarity(None, None, pairs)  # validated before the model is used


def test_word_similarity_minilm(minilm):
    r = word_similarity(*minilm, PAIRS, batch_size=4)
    assert r["n"] == len(PAIRS)
    assert r["rho"] > 0.8  # measured: 1.0 (the model ranks these six pairs as people do)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dataset, expected",
    [
        ("minilm-l6", wordsim353, 0.7289),
        ("minilm-l6", simlex999, 0.4462),
        ("mpnet-base", wordsim353, 0.7436),
        ("mpnet-base", simlex999, 0.5362),
    ],
    ids=["minilm-wordsim", "minilm-simlex", "mpnet-wordsim", "mpnet-simlex"],
)
def test_word_similarity_fp32_baselines(name, dataset, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))  # mpnet-base is extracted there (~6 s)
    model, tok = load_encoder(name, progress=False)
    pairs = dataset()
    r = word_similarity(model, tok, pairs)
    assert r["n"] == len(pairs)
    assert r["rho"] == pytest.approx(expected, abs=0.005)  # measured fp32, transformers 5.23, torch 2.13 CPU
