"""The evaluation data of ``lowbit report`` / ``lowbit debug``: ``--data SPEC`` read for a model.

- ``wiki[:N]`` (causal LMs): N windows of 512 held-out Wikipedia tokens (default 24), two per article
  from each article's opening; groups: the article.
- ``mnist[:N]``, ``fashion-mnist[:N]`` (classifiers): the first N test images (default all 10,000);
  groups: the true class.
- ``photos[:N]`` (ImageNet CNNs): the first N of the 480 evaluation photo crops (default 160); the float
  model's top-1 class is the label (top-1 agreement); groups: the photo, or the float model's class.
- ``simlex[:N]``, ``wordsim[:N]`` (sentence encoders): SimLex-999 / WordSim-353 word pairs (default all);
  the Spearman correlation of the model's cosine similarities with the human scores; groups: SimLex's
  part of speech (its file lists adjectives, nouns, then verbs), the human score band.

Sample ids (for a user's groups CSV) are ``0 .. N-1`` in that order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.core.errors import LowbitError

WINDOW = 512
PER_ARTICLE = 2 * WINDOW
DEFAULTS = {"wiki": 24, "mnist": None, "fashion-mnist": None, "photos": 160, "simlex": 999, "wordsim": 353}
LAYER_SAMPLES = {"wiki": 2, "mnist": 256, "fashion-mnist": 256, "photos": 8, "simlex": 64, "wordsim": 64}
SIMLEX_POS = ((0, 111, "adjective"), (111, 777, "noun"), (777, 999, "verb"))  # SimLex-999's file order


@dataclass
class EvalData:
    """``samples``: windows ``(n, WINDOW)``, images ``(n, ...)`` or word pairs ``[(w1, w2, human score)]``;
    ``labels``: classes ``(n,)`` (None for text; for photos filled in from the float model); ``groups``:
    grouping name -> label per sample; ``tokenizer`` (word pairs: the encoder's)."""

    spec: str
    kind: str  # "causal-lm", "classifier", "photos" or "embeddings"
    samples: torch.Tensor | list
    labels: torch.Tensor | None
    groups: dict[str, list[str]] = field(default_factory=dict)
    tokenizer: object = None

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self.samples))]

    @property
    def words(self) -> list[str]:
        """The distinct words of word pairs, sorted."""
        return sorted({w for a, b, _ in self.samples for w in (a, b)})

    def forward(self) -> Callable:
        """``forward(model, batch)`` for hooks (language models without a KV cache)."""
        if self.kind == "causal-lm":
            return lambda m, b: m(input_ids=b, use_cache=False)
        if self.kind == "embeddings":
            return lambda m, b: m(**b)
        return lambda m, b: m(b)

    def inputs(self, n: int):
        """The first ``n`` samples as one model input (word pairs: their first ``n`` words, tokenized)."""
        if self.kind == "embeddings":
            return dict(self.tokenizer(self.words[:n], padding=True, return_tensors="pt"))
        return self.samples[:n]

    def layer_batches(self) -> list:
        """A few samples for per-layer figures, one batch per window (text) or one batch (others)."""
        n = LAYER_SAMPLES[self.spec.partition(":")[0]]
        if self.kind == "causal-lm":
            return [w[None] for w in self.samples[:n]]
        return [self.inputs(n)]


def _parse(spec: str) -> tuple[str, int | None]:
    name, _, count = spec.partition(":")
    if name not in DEFAULTS or (count and not (count.isdigit() and int(count) > 0)):
        raise LowbitError(
            f"bad --data {spec!r}; expected wiki[:N], mnist[:N], fashion-mnist[:N], photos[:N], simlex[:N] "
            "or wordsim[:N] (N > 0)"
        )
    return name, int(count) if count else DEFAULTS[name]


def default_spec(model: nn.Module, tokenizer) -> str:
    """The data a model is evaluated on when ``--data`` is not given."""
    from lowbit.models.vision import VISION_MODELS

    if tokenizer is not None:
        return "wiki" if is_causal_lm(model) else "simlex"
    source = VISION_MODELS.get(getattr(model, "lowbit_source", None) or "")
    if source is None:
        raise LowbitError("no --data given and the model is not a bundled one; pass --data SPEC")
    return source.data


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts next tokens (a ``*ForCausalLM``), as opposed to a sentence encoder."""
    return type(model).__name__.endswith("ForCausalLM")


def read_data(spec: str, tokenizer, model: nn.Module | None = None) -> EvalData:
    """``spec`` read (module docstring) for ``model``; ``LowbitError`` for a bad spec or one the model
    cannot take."""
    name, n = _parse(spec)
    lm = model is None or is_causal_lm(model)
    if name in ("simlex", "wordsim"):
        if tokenizer is None or lm:
            raise LowbitError(f"--data {spec} is word pairs for sentence encoders; the model is not one")
        return _pairs(spec, name, n, tokenizer)
    if name == "wiki":
        if tokenizer is None:
            raise LowbitError(f"--data {spec} is text: the model has no tokenizer (pass image data instead)")
        if not lm:
            raise LowbitError(f"--data {spec} is for language models; for a sentence encoder use simlex")
        from lowbit.data import eval_articles, eval_windows

        windows, article = eval_windows(tokenizer, WINDOW, PER_ARTICLE)
        titles = [_title(a) for a in eval_articles()]
        article = article[:n].tolist()
        return EvalData(spec, "causal-lm", windows[:n], None, {"article": [titles[a] for a in article]})
    if tokenizer is not None:
        raise LowbitError(f"--data {spec} is images: the model is a language model (use --data wiki)")
    from lowbit.data import vision

    if name == "photos":
        crops = vision.photo_crops("eval", n)
        photos = [s[0] for s in vision.crop_specs("eval")[: len(crops)]]
        return EvalData(spec, "photos", crops, None, {"photo": photos})
    images, labels = vision.DATASETS[name]("test")
    images, labels = images[:n], labels[:n]
    return EvalData(spec, "classifier", images, labels, {"class": [str(int(c)) for c in labels]})


def _pairs(spec: str, name: str, n: int, tokenizer) -> EvalData:
    """SimLex-999 (groups: part of speech, human score band) or WordSim-353 (human score band)."""
    from lowbit.data.text_pairs import simlex999, wordsim353

    pairs = (simlex999() if name == "simlex" else wordsim353())[:n]
    bands = ["low (< 3.3)" if s < 10 / 3 else "high (>= 6.7)" if s >= 20 / 3 else "middle" for *_, s in pairs]
    groups = {"human score": bands}
    if name == "simlex":
        groups = {
            "part of speech": [next(p for a, b, p in SIMLEX_POS if a <= i < b) for i in range(n)]
        } | groups
    return EvalData(spec, "embeddings", list(pairs), None, groups, tokenizer)


def _title(article: str) -> str:
    """An article's subject: its first words up to " (" or " is " / " was " (the group name in reports)."""
    line = article.strip().splitlines()[0] if article.strip() else "(empty)"
    return re.split(r" \(| is | was | are | were ", line, maxsplit=1)[0][:40]


def check_fits(model: nn.Module, data: EvalData) -> None:
    """Run one sample through ``model``: ``LowbitError`` naming the mismatch if the data does not fit."""
    try:
        with torch.no_grad():
            data.forward()(model, data.inputs(1))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LowbitError(f"--data {data.spec} does not fit the model: {first}") from None
