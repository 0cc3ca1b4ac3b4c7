"""The evaluation data of ``lowbit report`` / ``lowbit debug``: ``--data SPEC`` read for a model.

- ``wiki[:N]`` (causal LMs): N windows of 512 held-out Wikipedia tokens (default 24), two per article
  from each article's opening; groups: the article.
- ``mnist[:N]``, ``fashion-mnist[:N]`` (classifiers): the first N test images (default all 10,000);
  groups: the true class.
- ``photos[:N]`` (ImageNet CNNs): the first N of the 480 evaluation photo crops (default 160); the float
  model's top-1 class is the label (top-1 agreement); groups: the photo.

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
DEFAULTS = {"wiki": 24, "mnist": None, "fashion-mnist": None, "photos": 160}
LAYER_SAMPLES = {"wiki": 2, "mnist": 256, "fashion-mnist": 256, "photos": 8}  # for per-layer figures


@dataclass
class EvalData:
    """``samples``: windows ``(n, WINDOW)`` or images ``(n, ...)``; ``labels``: classes ``(n,)`` (None for
    text; for photos filled in from the float model); ``groups``: grouping name -> label per sample."""

    spec: str
    kind: str  # "causal-lm", "classifier" or "photos"
    samples: torch.Tensor
    labels: torch.Tensor | None
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self.samples))]

    def forward(self) -> Callable:
        """``forward(model, batch)`` for hooks (language models without a KV cache)."""
        if self.kind == "causal-lm":
            return lambda m, b: m(input_ids=b, use_cache=False)
        return lambda m, b: m(b)

    def layer_batches(self) -> list[torch.Tensor]:
        """A few samples for per-layer figures, one batch per window (text) or one batch (images)."""
        n = LAYER_SAMPLES[self.spec.partition(":")[0]]
        if self.kind == "causal-lm":
            return [w[None] for w in self.samples[:n]]
        return [self.samples[:n]]


def _parse(spec: str) -> tuple[str, int | None]:
    name, _, count = spec.partition(":")
    if name not in DEFAULTS or (count and not (count.isdigit() and int(count) > 0)):
        raise LowbitError(
            f"bad --data {spec!r}; expected wiki[:N], mnist[:N], fashion-mnist[:N] or photos[:N] (N > 0)"
        )
    return name, int(count) if count else DEFAULTS[name]


def default_spec(model: nn.Module, tokenizer) -> str:
    """The data a model is evaluated on when ``--data`` is not given."""
    from lowbit.models.vision import VISION_MODELS

    if tokenizer is not None:
        return "wiki"
    source = VISION_MODELS.get(getattr(model, "lowbit_source", None) or "")
    if source is None:
        raise LowbitError("no --data given and the model is not a bundled one; pass --data SPEC")
    return source.data


def read_data(spec: str, tokenizer) -> EvalData:
    """``spec`` read (module docstring); ``LowbitError`` for a bad spec or one the model cannot take."""
    name, n = _parse(spec)
    if name == "wiki":
        if tokenizer is None:
            raise LowbitError(f"--data {spec} is text: the model has no tokenizer (pass image data instead)")
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


def _title(article: str) -> str:
    """An article's subject: its first words up to " (" or " is " / " was " (the group name in reports)."""
    line = article.strip().splitlines()[0] if article.strip() else "(empty)"
    return re.split(r" \(| is | was | are | were ", line, maxsplit=1)[0][:40]


def check_fits(model: nn.Module, data: EvalData) -> None:
    """Run one sample through ``model``: ``LowbitError`` naming the mismatch if the data does not fit."""
    try:
        with torch.no_grad():
            data.forward()(model, data.samples[:1])
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LowbitError(f"--data {data.spec} does not fit the model: {first}") from None
