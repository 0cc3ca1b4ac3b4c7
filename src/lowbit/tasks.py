"""``lowbit eval``: one model on one task, perplexity on held-out Wikipedia or the user's text, accuracy on
a bundled test split or the user's image folder, top-1 agreement with the float model on photos."""

from __future__ import annotations

import os
import time

from lowbit.core.errors import LowbitError
from lowbit.workflows import load_any

VISION_TASKS = ("mnist", "fashion-mnist", "photos")
TASKS = ("wiki-ppl", *VISION_TASKS)


def evaluate(
    ref: str | os.PathLike,
    task: str = "wiki-ppl",
    *,
    n_tokens: int = 8192,
    window: int = 512,
    progress: bool = True,
    verify: bool = True,
) -> dict:
    """Run ``task`` on model ``ref``; returns a JSON-ready dict. ``verify``: see ``load_any``."""
    kind, _, path = task.partition(":")
    if task not in TASKS and not (kind in ("ppl", "accuracy") and path):
        raise LowbitError(f"unknown task {task!r}; available: {', '.join(TASKS)}, ppl:FILE, accuracy:DIR")
    if task in VISION_TASKS or kind == "accuracy":
        return _evaluate_vision(ref, task, progress, verify)
    from lowbit.data import eval_tokens
    from lowbit.eval.perplexity import perplexity

    model, tok = load_any(ref, progress, verify)
    if tok is None:
        raise LowbitError(f"--task {task} measures perplexity: {ref} has no tokenizer")
    tokens = eval_tokens(tok, n_tokens) if kind != "ppl" else _user_tokens(tok, path, n_tokens, window)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens, window=window, progress=progress)
    return {
        "model": str(ref),
        "task": task,
        "perplexity": ppl,
        "tokens": len(tokens) // window * window,
        "window": window,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _user_tokens(tok, path: str, n_tokens: int, window: int):
    """The first ``n_tokens`` tokens of text file ``path`` (at least one window)."""
    from lowbit.data import user
    from lowbit.data.tokens import tokenize

    ids = tokenize(tok, [user.read_text(user.parse(f"text:{path}").path)])[:n_tokens]
    if len(ids) < window:
        raise LowbitError(f"{path}: {len(ids)} tokens, fewer than one window of {window}")
    return ids


def _user_images(model, folder: str, ref):
    """(images, labels) of an ImageFolder for ``model`` (``lowbit.data.user.image_classes``)."""
    from lowbit.data import user
    from lowbit.models.vision import preprocess_of

    pre = preprocess_of(model)
    if pre is None:
        raise LowbitError(
            f"--task accuracy:DIR: {ref} is not a bundled image model; its input size is unknown"
        )
    path = user.parse(f"images:{folder}").path
    images, labels, _ = user.image_classes(path, pre)
    return images, labels


def _evaluate_vision(ref, task: str, progress: bool, verify: bool) -> dict:
    """Top-1 accuracy on the test split (``mnist``, ``fashion-mnist``), or top-1 agreement with the float
    model on the 480 evaluation photo crops (``photos``; the float model from the checkpoint's source)."""
    from lowbit import models
    from lowbit.data import vision
    from lowbit.eval.accuracy import accuracy, agreement, predict

    model, tok = load_any(ref, progress, verify)
    if tok is not None:
        raise LowbitError(f"--task {task} evaluates image classifiers; {ref} is a language model")
    t0 = time.perf_counter()
    try:
        if task.startswith("accuracy:"):
            images, labels = _user_images(model, task.partition(":")[2], ref)
            result = {"accuracy": accuracy(model, images, labels), "reference": "folder names"}
        elif task == "photos":
            images = vision.photo_crops("eval")
            source = getattr(model, "lowbit_source", None) or str(ref)
            reference = predict(models.load(source, progress=progress)[0], images)
            result = {"accuracy": agreement(model, reference, images), "reference": f"{source} (float)"}
        else:
            images, labels = vision.DATASETS[task]("test")
            result = {"accuracy": accuracy(model, images, labels), "reference": "labels"}
    except RuntimeError as e:
        raise LowbitError(f"{ref} does not take {task} images: {str(e).splitlines()[0][:160]}") from None
    seconds = round(time.perf_counter() - t0, 2)
    return {"model": str(ref), "task": task, **result, "images": len(images), "seconds": seconds}
