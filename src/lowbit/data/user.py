"""The user's own data, from files, for calibration (``--calib``) and evaluation (``--task``).

| spec                       | what                                                                         |
|----------------------------|------------------------------------------------------------------------------|
| ``text:FILE[:NxL]``        | UTF-8 text, tokenized, cut into N samples of L tokens (default 128x512)      |
| ``jsonl:FILE:FIELD[:NxL]`` | the string ``FIELD`` of every JSON line, joined by blank lines, as text      |
| ``images:DIR[:N]``         | the JPEG/PNG files of ``DIR`` (sorted by name; at most N), each resized and  |
|                            | normalised as the model's inputs (``Preprocess``)                             |
| ``tensors:FILE``           | a safetensors file: every tensor, sorted by name, is one batch as stored      |

Evaluation: ``ppl:FILE`` (perplexity on a text file) and ``accuracy:DIR`` (ImageFolder layout: one folder
per class, named by the class index, e.g. ``DIR/3/x.png``; folders not named by integers are numbered
in sorted order, as torchvision's ``ImageFolder`` does).

Images: the largest centred square is cut out, resized (bilinear, antialiased) to the model's input size,
converted to its channels (RGB or greyscale), scaled to [0, 1] and normalised with its mean and std;
folders with photos of different sizes are fine. Every failure names the file (and the JSON line).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.core.errors import LowbitError
from lowbit.data.tokens import tokenize

KINDS = ("text", "jsonl", "images", "tensors")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_SAMPLES, DEFAULT_LENGTH = 128, 512
_SIZE = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class Preprocess:
    """A model's image input: ``channels`` (1 or 3), square ``size`` in pixels, per-channel mean/std."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class UserSpec:
    kind: str
    path: Path
    field: str | None = None
    count: int | None = None
    length: int | None = None


def is_user_spec(spec: str) -> bool:
    return spec.partition(":")[0] in KINDS


def parse(spec: str) -> UserSpec:
    """``spec`` of the module table, checked (the file or folder must exist); ``LowbitError`` otherwise."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    count = length = field = None
    if kind in ("text", "jsonl") and len(parts) > 1 and _SIZE.fullmatch(parts[-1]):
        count, length = (int(v) for v in _SIZE.fullmatch(parts.pop()).groups())
    elif kind == "images" and len(parts) > 1 and parts[-1].isdigit():
        count = int(parts.pop())
    if kind == "jsonl":
        if len(parts) < 2 or not parts[-1]:
            raise LowbitError(f"bad spec {spec!r}: write jsonl:FILE:FIELD[:NxL]")
        field = parts.pop()
    path = Path(":".join(parts))
    if (
        kind not in KINDS
        or not parts[0]
        or (count is not None and count < 1)
        or (length is not None and length < 2)
    ):
        raise LowbitError(f"bad spec {spec!r}: write text:FILE[:NxL], jsonl:FILE:FIELD[:NxL], images:DIR[:N] "
                          "or tensors:FILE")  # fmt: skip
    want_dir = kind == "images"
    if not (path.is_dir() if want_dir else path.is_file()):
        raise LowbitError(f"{path}: no such {'folder' if want_dir else 'file'} ({spec})")
    return UserSpec(kind, path, field, count, length)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ``LowbitError`` if unreadable, not UTF-8 or blank."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise LowbitError(f"{path} is empty: it needs text to tokenize")
    return text


def jsonl_lines(path: Path) -> list[tuple[str, object]]:
    """``(where, value)`` of every non-blank line of JSONL file ``path`` (``where``: "PATH, line N", for
    messages); ``LowbitError`` naming the line for invalid JSON (and ``read_text``'s)."""
    values = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((f"{path}, line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}, line {i}: not JSON ({e.msg})") from None
    return values


def jsonl_text(path: Path, field: str) -> str:
    """The string ``field`` of every JSON line of ``path`` joined by blank lines; blank lines skipped;
    ``LowbitError`` naming the line for invalid JSON, a line that is not an object or lacks the field."""
    texts = []
    for where, obj in jsonl_lines(path):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise LowbitError(f"{where}: no string field {field!r}")
        texts.append(obj[field])
    return "\n\n".join(texts)


def text_samples(tokenizer, text: str, n: int, length: int, where: str) -> list[torch.Tensor]:
    """The first ``n`` windows of ``length`` tokens of ``text``, LongTensors (1, length); fewer, with a
    warning, if the text is shorter; ``LowbitError`` if it holds not even one."""
    ids = tokenize(tokenizer, [text])
    have = ids.numel() // length
    if have == 0:
        raise LowbitError(f"{where}: {ids.numel()} tokens, fewer than one sample of {length}")
    if have < n:
        warnings.warn(f"{where}: {ids.numel()} tokens make {have} samples of {length}, not {n}", stacklevel=2)
    return [ids[i * length : (i + 1) * length][None] for i in range(min(n, have))]


def image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` (top level, sorted); ``LowbitError`` naming one that is not JPEG/PNG."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    odd = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if odd:
        raise LowbitError(f"{odd[0]}: not a JPEG or PNG image ({len(odd)} such file(s) in {folder})")
    if not files:
        raise LowbitError(f"{folder}: no JPEG or PNG images")
    return files


def load_image(path: Path, pre: Preprocess) -> torch.Tensor:
    """float32 ``(channels, size, size)``: the file preprocessed as the module docstring says."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if pre.channels == 3 else "L")
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            im = im.resize((pre.size, pre.size), Image.Resampling.BILINEAR, box=box)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot decode the image ({type(e).__name__})") from None
    x = data.reshape(pre.size, pre.size, pre.channels).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    return (x - mean) / torch.tensor(pre.std).view(-1, 1, 1)


def image_folder(folder: Path, pre: Preprocess, n: int | None = None) -> torch.Tensor:
    """float32 ``(N, channels, size, size)``: the first ``n`` images of ``folder`` (all by default)."""
    return torch.stack([load_image(p, pre) for p in image_files(folder)[:n]])


def image_classes(folder: Path, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, class names)`` of an ImageFolder layout (module docstring)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LowbitError(f"{folder}: no class folders (expected DIR/<class>/<image>.png)")
    numbered = all(c.name.isdigit() for c in classes)
    images, labels = [], []
    for i, c in enumerate(classes):
        x = image_folder(c, pre)
        images.append(x)
        labels.append(torch.full((len(x),), int(c.name) if numbered else i, dtype=torch.long))
    return torch.cat(images), torch.cat(labels), [c.name for c in classes]


def tensor_batches(path: Path) -> list[torch.Tensor]:
    """Every tensor of safetensors ``path``, sorted by name; ``LowbitError`` if unreadable or empty."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"{path}: not a readable safetensors file ({str(e)[:100]})") from None
    if not tensors:
        raise LowbitError(f"{path}: holds no tensors")
    return [tensors[k] for k in sorted(tensors)]


def calibration(spec: str, tokenizer=None, pre: Preprocess | None = None, batch_size: int = 32) -> list:
    """Calibration batches of a user ``spec``: text samples (1, L), image batches, or the stored tensors."""
    s = parse(spec)
    if s.kind in ("text", "jsonl"):
        if tokenizer is None:
            raise LowbitError(f"--calib {spec}: text needs a model with a tokenizer")
        text = read_text(s.path) if s.kind == "text" else jsonl_text(s.path, s.field)
        return text_samples(
            tokenizer, text, s.count or DEFAULT_SAMPLES, s.length or DEFAULT_LENGTH, str(s.path)
        )
    if s.kind == "images":
        if pre is None:
            raise LowbitError(f"--calib {spec}: images need an image model (its input size is unknown)")
        return list(image_folder(s.path, pre, s.count).split(batch_size))
    return tensor_batches(s.path)
