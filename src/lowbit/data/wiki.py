"""Plain-text Wikipedia articles from gensim's test data, and the fixed evaluation / calibration split.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(206 pages of a 2017 English Wikipedia dump), located through ``find_spec("gensim")``.

Articles: main-namespace pages in dump order, minus redirects; markup stripped with gensim's
``filter_wiki`` plus headings/bold/italic cleanup; pages shorter than ``MIN_CHARS`` characters after
stripping are dropped. That leaves about 100 articles (~3 M characters).

Split (by article, fixed): article ``i`` (0-based, in the order above) is held out for evaluation if
``i % EVAL_EVERY == 0``; all others are for calibration. The two parts share no article.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from pathlib import Path

from lowbit.core.errors import LowbitError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_CHARS = 1000
EVAL_EVERY = 4

_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_EMPTY_BULLET = re.compile(r"^[*#:;]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


def wiki_path() -> Path:
    """Path of gensim's bundled Wikipedia dump (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the Wikipedia text ships with gensim, which is not installed: pip install gensim")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "test" / "test_data" / WIKI_FILE
        if path.is_file():
            return path
    raise LowbitError(f"gensim is installed but its test data file {WIKI_FILE} is missing; reinstall gensim")


def clean_wiki(markup: str) -> str:
    """Wiki markup -> plain text: paragraphs separated by one blank line, no leading/trailing space."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = _HEADING.sub(r"\2", text)
    text = text.replace("'''", "").replace("''", "")
    text = "\n".join(line.strip() for line in text.splitlines())
    text = _EMPTY_BULLET.sub("", text)
    return _BLANK_RUN.sub("\n\n", text).strip()


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(wiki_path()) as f:
        pages = list(extract_pages(f, filter_namespaces=("0",)))
    texts = (
        clean_wiki(markup) for _, markup, _ in pages if not markup.lstrip().lower().startswith("#redirect")
    )
    return tuple(t for t in texts if len(t) >= MIN_CHARS)


def wiki_articles() -> list[str]:
    """All kept articles as plain text, in dump order (parsed once per process, ~3 s)."""
    return list(_articles())


def eval_articles() -> list[str]:
    """The held-out evaluation part: articles ``i`` with ``i % EVAL_EVERY == 0``."""
    return [a for i, a in enumerate(_articles()) if i % EVAL_EVERY == 0]


def calib_articles() -> list[str]:
    """The calibration part: every article not in ``eval_articles()``."""
    return [a for i, a in enumerate(_articles()) if i % EVAL_EVERY != 0]
