"""Text data: gensim's Wikipedia test dump split into a held-out evaluation part and a disjoint
calibration part (``lowbit.data.wiki`` documents the rule). Nothing is read until a function is called.
"""

from lowbit.data.text_pairs import sentences, simlex999, wordsim353
from lowbit.data.tokens import calib_batches, eval_tokens, eval_windows
from lowbit.data.vision import fashion_mnist, mnist, photo_crops
from lowbit.data.wiki import EVAL_EVERY, calib_articles, eval_articles, wiki_articles

__all__ = [
    "EVAL_EVERY",
    "calib_articles",
    "calib_batches",
    "eval_articles",
    "eval_tokens",
    "eval_windows",
    "fashion_mnist",
    "mnist",
    "photo_crops",
    "sentences",
    "simlex999",
    "wiki_articles",
    "wordsim353",
]
