"""Text for sentence encoders, from gensim's test data (found through ``find_spec("gensim")``).

Word pairs with human similarity scores (0-10): ``wordsim353()`` (WordSim-353, 353 pairs) and
``simlex999()`` (SimLex-999, 999 pairs); tab-separated ``word1 word2 score`` lines, ``#`` comments.

Sentences: the Lee news corpus, ``lee_background.cor`` (300 documents) then ``lee.cor`` (50), one
document per line, read as Latin-1. Document ``i`` (0-based, in that order) belongs to the "eval" split
if ``i % EVAL_EVERY == 0``, else to "calib". Each document is cut into sentences at ``.``/``!``/``?``
followed by a space and a capital letter, digit or opening quote (not after titles such as ``Mr.`` or
initials such as ``U.S.``); runs of whitespace become one space; sentences of fewer than ``MIN_WORDS``
words are dropped, and so are repeats (first occurrence kept; a calib sentence equal to an eval one is
dropped). That gives 761 eval and 1,976 calib sentences; the two splits share no sentence and no document.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from lowbit.core.errors import CheckpointError, LowbitError

WORDSIM_FILE = "wordsim353.tsv"
SIMLEX_FILE = "simlex999.txt"
LEE_FILES = ("lee_background.cor", "lee.cor")
EVAL_EVERY = 4
MIN_WORDS = 5
SPLITS = ("calib", "eval")

_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # "U.S" or "W" before the final period
_TITLES = frozenset(
    "mr mrs ms dr prof st sen rep gov gen col lt sgt capt jan feb aug sept oct nov dec".split()
)


def gensim_test_file(name: str) -> Path:
    """Path of file ``name`` in gensim's bundled test data (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"{name} ships with gensim's test data, but gensim is not installed: pip install gensim"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "test" / "test_data" / name
        if path.is_file():
            return path
    raise LowbitError(f"gensim is installed but its test data file {name} is missing; reinstall gensim")


def read_pairs(path: str | Path) -> list[tuple[str, str, float]]:
    """``(word1, word2, score)`` from a tab-separated file; blank and ``#`` lines are skipped.

    Raises ``CheckpointError`` naming ``path:line`` for a line that is not ``word<TAB>word<TAB>number``.
    """
    path = Path(path)
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        try:
            if len(fields) != 3 or not fields[0] or not fields[1]:
                raise ValueError("expected 3 tab-separated fields")
            pairs.append((fields[0], fields[1], float(fields[2])))
        except ValueError as e:
            raise CheckpointError(
                f"{path}:{lineno}: not a 'word<TAB>word<TAB>score' line ({e}): {line!r}"
            ) from e
    return pairs


@functools.lru_cache(maxsize=None)
def _pairs(name: str) -> tuple[tuple[str, str, float], ...]:
    return tuple(read_pairs(gensim_test_file(name)))


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353: 353 ``(word1, word2, relatedness 0-10)`` in file order (words keep their case)."""
    return list(_pairs(WORDSIM_FILE))


def simlex999() -> list[tuple[str, str, float]]:
    """SimLex-999: 999 ``(word1, word2, similarity 0-10)`` in file order."""
    return list(_pairs(SIMLEX_FILE))


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the ``.`` at ``text[end]`` closes a title (``Mr.``) or initials (``U.S.``), not a sentence."""
    if text[end] != ".":
        return False
    words = text[:end].split()
    word = words[-1].lstrip("\"'([") if words else ""
    return word.lower() in _TITLES or _INITIALS.fullmatch(word) is not None


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace collapsed, stripped), cut by the rule in the module docstring."""
    text = " ".join(text.split())
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if _is_abbreviation(text, m.start()):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


@functools.lru_cache(maxsize=1)
def _split() -> dict[str, tuple[str, ...]]:
    docs = []
    for name in LEE_FILES:
        lines = gensim_test_file(name).read_text(encoding="latin-1").splitlines()
        docs.extend(line for line in lines if line.strip())
    parts: dict[str, list[str]] = {"eval": [], "calib": []}
    seen: set[str] = set()
    for split in ("eval", "calib"):  # eval first: a repeated sentence stays in eval
        for i, doc in enumerate(docs):
            if (i % EVAL_EVERY == 0) != (split == "eval"):
                continue
            for s in split_sentences(doc):
                if len(s.split()) >= MIN_WORDS and s not in seen:
                    seen.add(s)
                    parts[split].append(s)
    return {k: tuple(v) for k, v in parts.items()}


def sentences(split: str, n: int | None = None) -> list[str]:
    """English news sentences of ``split`` ("calib" or "eval"), in corpus order.

    ``n`` None: all of them. ``n`` given: ``n`` sentences evenly spaced over the split (index
    ``i * total // n`` for ``i < n``), so they span all of its documents. Deterministic.
    """
    if split not in SPLITS:
        raise LowbitError(f"unknown sentence split {split!r}; expected one of {', '.join(SPLITS)}")
    pool = _split()[split]
    if n is None:
        return list(pool)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool):
        raise LowbitError(f"n must be an integer in [1, {len(pool)}] for the {split!r} split, got {n!r}")
    return [pool[i * len(pool) // n] for i in range(n)]
