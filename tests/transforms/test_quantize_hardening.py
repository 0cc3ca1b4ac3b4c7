"""quantize_ on models it cannot or need not fully quantize: meta-device weights, a bare layer as the root,
zero-size layers, and layers with weights no config handles (listed in the summary, not dropped silently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, quantize_
from lowbit.transforms import Int8Dynamic, StaticW8A8, WeightOnly

W8 = WeightOnly(bits=8, group_size=None, symmetric=True)
CONFIGS = [W8, WeightOnly(bits=4, group_size=4), Int8Dynamic()]
CONFIG_IDS = ["w8", "w4g4", "int8dynamic"]


def _calib(shape=(2, 8), n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _run(model, config, calib):
    return quantize_(model, config, calib if isinstance(config, StaticW8A8) else None)


@pytest.mark.parametrize("config", [*CONFIGS, StaticW8A8()], ids=[*CONFIG_IDS, "static"])
def test_meta_device_model_is_refused(config):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(LowbitError, match=r"meta device \(not loaded\).*0\.weight.*load its weights first"):
        _run(model, config, _calib())
    assert type(model[0]) is nn.Linear  # left as it came


@pytest.mark.parametrize("config", [*CONFIGS, StaticW8A8()], ids=[*CONFIG_IDS, "static"])
@pytest.mark.parametrize(
    "layer", [lambda: nn.Linear(8, 8), lambda: nn.Embedding(10, 8), lambda: nn.Conv2d(3, 4, 3)],
    ids=["linear", "embedding", "conv2d"],
)  # fmt: skip
def test_bare_layer_as_root_is_refused(layer, config):
    """quantize_ works in place and cannot replace the object it was given: wrap the layer."""
    root = layer()
    with pytest.raises(LowbitError, match=r"bare .* as the model.*nn\.Sequential\(layer\)"):
        _run(root, config, _calib())


@pytest.mark.parametrize("config", [*CONFIGS, StaticW8A8()], ids=[*CONFIG_IDS, "static"])
def test_wrapped_layer_quantizes(config):
    model = nn.Sequential(nn.Linear(8, 8))
    summary = _run(model, config, _calib())
    assert set(summary.quantized) == {"0"} and not isinstance(model[0], nn.Linear)


class _ZeroSize(nn.Module):
    """A Linear, and a zero-size Linear that also runs (on an empty or an 8-wide input)."""

    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(in_f, out_f)

    def forward(self, x):
        return self.a(x).sum() + self.b(x[:, : self.b.in_features]).sum()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("config", [*CONFIGS, StaticW8A8()], ids=[*CONFIG_IDS, "static"])
@pytest.mark.parametrize(("in_f", "out_f"), [(0, 8), (8, 0)], ids=["in0", "out0"])
def test_zero_size_linear_is_skipped(in_f, out_f, config):
    """A Linear with no weight element is kept float with its reason; the other one is quantized."""
    model = _ZeroSize(in_f, out_f)
    summary = _run(model, config, _calib())
    assert set(summary.quantized) == {"a"} and type(model.b) is nn.Linear
    assert summary.skipped == {"b": f"zero-size weight ({out_f}, {in_f}): nothing to quantize"}
    assert model(torch.randn(2, 8)).isfinite()


class Mixed(nn.Module):
    """One Linear and one of each weight-bearing layer lowbit does not quantize (Conv2d: only static)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.bilinear = nn.Bilinear(8, 8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 8)

    def forward(self, x):  # (b, 4, 16)
        h = self.bn(self.conv1(x))  # (b, 8, 16)
        h = self.conv2(h[:, None]).mean(1).transpose(1, 2)  # (b, 16, 8)
        h = self.gru(self.lstm(h)[0])[0]
        h = self.norm(self.attn(h, h, h)[0])
        return self.head(self.act(self.bilinear(h, h)))


FLOAT_LAYERS = {
    "conv1": "Conv1d",
    "conv2": "Conv2d",
    "lstm": "LSTM",
    "gru": "GRU",
    "attn": "MultiheadAttention",
    "bilinear": "Bilinear",
}


@pytest.mark.parametrize("config", [*CONFIGS, StaticW8A8()], ids=[*CONFIG_IDS, "static"])
def test_layers_left_float_are_listed(config):
    """Every weight-bearing compute layer a config leaves float is in ``summary.skipped`` with its reason
    (a layer inside one, MHA's out_proj, is covered by its parent's entry); norms and activations are
    counted in ``float_ops``, not listed."""
    model = Mixed()
    summary = _run(model, config, _calib((2, 4, 16)))
    name = type(config).__name__
    float_layers = dict(FLOAT_LAYERS)
    if isinstance(config, StaticW8A8):
        del float_layers["conv2"]  # quantized by StaticW8A8
    assert set(summary.quantized) == {"head"} | ({"conv2"} if isinstance(config, StaticW8A8) else set())
    expected = {fqn: f"{kind}: not supported by {name}" for fqn, kind in float_layers.items()}
    assert summary.skipped == expected
    assert summary.float_ops["BatchNorm1d"] == 1 and summary.float_ops["LayerNorm"] == 1
    assert summary.float_ops["ReLU"] == 1 and "QLinear" not in summary.float_ops
    text = str(summary)
    assert "kept float: conv1 (Conv1d: not supported by" in text and "BatchNorm1d x1" in text


def test_excluded_layers_are_not_listed():
    """Layers the user deselected are their choice, not something the config left out."""
    summary = quantize_(Mixed(), W8, exclude=["conv*", "lstm"])
    assert not {"conv1", "conv2", "lstm"} & set(summary.skipped)
    assert {"gru", "attn", "bilinear"} <= set(summary.skipped)


def test_transformers_conv1d_is_listed():
    """GPT-2 style ``Conv1D`` (a Linear with a transposed weight) is not quantized: it is listed."""
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 8), nn.Linear(8, 8))
    summary = quantize_(model, W8)
    assert summary.skipped == {"0": "Conv1D: not supported by WeightOnly"}
    assert set(summary.quantized) == {"1"} and isinstance(model[1], lowbit.QLinear)


def test_embeddings_kept_float_keep_their_reason():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    summary = quantize_(model, WeightOnly(bits=4, group_size=4, quantize_embeddings=False))
    assert summary.skipped == {"0": "embeddings kept float by config"}
