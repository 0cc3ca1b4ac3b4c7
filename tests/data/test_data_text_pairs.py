"""Word-similarity pairs and Lee-corpus sentences from gensim's test data."""

import importlib.util

import pytest

from lowbit import CheckpointError, LowbitError
from lowbit.data.text_pairs import (
    EVAL_EVERY,
    MIN_WORDS,
    gensim_test_file,
    read_pairs,
    sentences,
    simlex999,
    split_sentences,
    wordsim353,
)


def test_wordsim353():
    pairs = wordsim353()
    assert len(pairs) == 353
    assert pairs[0] == ("love", "sex", 6.77) and pairs[2] == ("tiger", "tiger", 10.0)
    assert all(0.0 <= s <= 10.0 for _, _, s in pairs)
    assert pairs == wordsim353() and pairs is not wordsim353()


def test_simlex999():
    pairs = simlex999()
    assert len(pairs) == 999
    assert pairs[0] == ("old", "new", 1.58) and pairs[-1] == ("attend", "arrive", 6.08)
    assert all(0.0 <= s <= 10.0 and a and b for a, b, s in pairs)


def test_read_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "# header\n# Word 1\tWord 2\tHuman (mean)\n\ncat\tdog\t7.5\n  # indented comment\nA\tb\t1\n"
    )
    assert read_pairs(path) == [("cat", "dog", 7.5), ("A", "b", 1.0)]
    path.write_text("# header\ncat\tdog\t7.5\ncat dog 3\n")
    with pytest.raises(CheckpointError, match=r"pairs.tsv:3: not a 'word<TAB>word<TAB>score' line"):
        read_pairs(path)
    path.write_text("cat\tdog\thigh\n")
    with pytest.raises(CheckpointError, match=r"pairs.tsv:1: .*could not convert"):
        read_pairs(path)


def test_missing_gensim_data(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gensim" else real(n, *a))
    with pytest.raises(LowbitError, match="gensim is not installed: pip install gensim"):
        gensim_test_file("wordsim353.tsv")
    monkeypatch.undo()
    with pytest.raises(LowbitError, match="test data file nope.txt is missing; reinstall gensim"):
        gensim_test_file("nope.txt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("One two. Three four!  Five?", ["One two.", "Three four!", "Five?"]),
        ("Mr. Smith met Dr. Jones. They left.", ["Mr. Smith met Dr. Jones.", "They left."]),
        ("The U.S. Army and George W. Bush. Done.", ["The U.S. Army and George W. Bush.", "Done."]),
        ('He said "no." Then left. 5 stayed.', ['He said "no."', "Then left.", "5 stayed."]),
        ("Values like 3.5 and e.g. lowercase. stay", ["Values like 3.5 and e.g. lowercase. stay"]),
        ("Line\n\tbreaks   collapse.", ["Line breaks collapse."]),
    ],
    ids=["plain", "titles", "initials", "quotes", "no-capital", "whitespace"],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_is_fixed_and_disjoint():
    calib, ev = sentences("calib"), sentences("eval")
    assert (len(calib), len(ev)) == (1976, 761)  # counts stated in the module docstring
    assert not set(calib) & set(ev)
    assert len(set(calib)) == len(calib) and len(set(ev)) == len(ev)
    assert all(len(s.split()) >= MIN_WORDS and s == " ".join(s.split()) for s in calib + ev)
    assert ev[0].startswith("Hundreds of people have been forced to vacate their homes")  # document 0
    assert calib == sentences("calib") and EVAL_EVERY == 4
    assert any("£" in s for s in calib + ev)  # lee.cor is read as Latin-1


def test_sentences_subset():
    calib = sentences("calib")
    sub = sentences("calib", 512)
    assert len(sub) == 512 and sub == sentences("calib", 512)
    assert sub == [calib[i * len(calib) // 512] for i in range(512)]
    assert sub[-1] in calib[-4:]  # spans the whole split
    assert sentences("eval", 1) == sentences("eval")[:1]


@pytest.mark.parametrize(
    "split, n, match",
    [
        ("train", None, "unknown sentence split 'train'; expected one of calib, eval"),
        ("eval", 0, r"n must be an integer in \[1, 761\]"),
        ("eval", 762, r"n must be an integer in \[1, 761\] for the 'eval' split, got 762"),
        ("calib", 2.0, "got 2.0"),
    ],
    ids=["split", "zero", "too-many", "float"],
)
def test_sentences_errors(split, n, match):
    with pytest.raises(LowbitError, match=match):
        sentences(split, n)
