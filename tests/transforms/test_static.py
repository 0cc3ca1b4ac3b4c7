"""StaticW8A8 end to end on small random-weight nets: invariance to float within quantization error,
save/load round trip, summary contents and every bad input named in the issue. (Random weights: these
are correctness tests, not accuracy claims; accuracy is measured on real models in benchmarks/.)"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, NonFiniteError, QStaticConv2d, QStaticLinear, StaticW8A8, quantize_


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6()),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 12, 12, generator=g) for _ in range(n)]


def _sqnr_db(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "kl", "mse"])
def test_static_close_to_float(observer):
    net = _cnn()
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        ref = net(x)
    summary = quantize_(net, StaticW8A8(observer=observer), calib=_batches())
    assert len(summary.quantized) == 4 and len(summary.folded) == 2
    assert summary.fused == {"0.2": "0.0", "1.2": "1.0", "3": "2"}
    assert isinstance(net[0][0], QStaticConv2d) and isinstance(net[6], QStaticLinear)
    assert set(summary.float_ops) == {"AdaptiveAvgPool2d", "Flatten"}
    with torch.no_grad():
        out = net(x)
    assert _sqnr_db(ref, out) > 25  # int8 W8A8 on this net: ~30-38 dB measured


def test_int8_activations_and_mse_weights():
    net = _cnn()
    s = quantize_(net, StaticW8A8(activation_format="int8", weight_observer="mse"), calib=_batches())
    assert net[0][0].input_zero_point.dtype == torch.int8 and int(net[0][0].input_zero_point) == 0
    assert not s.fused and isinstance(net[0][2], nn.ReLU)  # symmetric codes cannot stand for a ReLU


def test_fused_activation_gives_the_next_layer_the_same_qparams():
    net = _cnn()
    quantize_(net, StaticW8A8(observer="percentile"), calib=_batches())
    assert int(net[0][0].output_zero_point) == 0 and isinstance(net[0][2], nn.Identity)
    assert torch.equal(net[0][0].output_scale, net[1][0].input_scale)  # same tensor, same observer
    net2 = _cnn()
    quantize_(net2, StaticW8A8(fuse_activations=False), calib=_batches())
    assert isinstance(net2[0][2], nn.ReLU) and float(net2[0][0].output_scale) > 0


def test_save_load_round_trip(tmp_path):
    net = _cnn()
    quantize_(net, StaticW8A8(observer="percentile"), calib=_batches())
    x = torch.randn(4, 1, 12, 12)
    lowbit.save(net, tmp_path / "cnn")
    back = lowbit.load(tmp_path / "cnn", model=_cnn())
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_include_exclude_and_unreached_layers():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    m = Two()
    s = quantize_(m, StaticW8A8(), calib=[torch.randn(2, 4)])
    assert "a" in s.quantized and "no calibration batch" in s.skipped["unused"]
    assert isinstance(m.unused, nn.Linear)
    net = _cnn()
    s = quantize_(net, StaticW8A8(), calib=_batches(), exclude=("6",))
    assert "6" not in s.quantized and isinstance(net[6], nn.Linear)


def test_mapping_batches():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, input_ids, scale=1.0):
            return self.lin(input_ids * scale)

    quantize_(Kw(), StaticW8A8(), calib=[{"input_ids": torch.randn(3, 4), "scale": 2.0}])


@pytest.mark.parametrize(
    "calib, match",
    [
        ([], "calibration set is empty"),
        (None, "needs calibration data"),
        (
            [torch.randn(8, 3, 12, 12)],
            r"calibration batch 0 \(tensor \(8, 3, 12, 12\) float32\) does not fit",
        ),
        ([torch.randint(0, 9, (8, 1, 12, 12))], r"calibration batch 0 \(tensor \(8, 1, 12, 12\) int64\)"),
        ([torch.randn(2, 1, 12, 12), "text"], "tensors, mappings or tuples"),
    ],
    ids=["empty", "none", "wrong-shape", "wrong-dtype", "wrong-type"],
)
def test_bad_calibration(calib, match):
    net = _cnn()
    before = _snapshot(net)
    with pytest.raises(LowbitError, match=match):
        quantize_(net, StaticW8A8(), calib=calib)
    _assert_unchanged(net, before)  # BatchNorm folding undone, nothing swapped


def _snapshot(net):
    return [type(m) for m in net.modules()], copy.deepcopy(net.state_dict())


def _assert_unchanged(net, before):
    types, state = before
    assert [type(m) for m in net.modules()] == types
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_nan_in_calibration_names_the_layer():
    bad = torch.randn(2, 1, 12, 12)
    bad[0, 0, 0, 0] = float("nan")
    net = _cnn()
    before = _snapshot(net)
    with pytest.raises(NonFiniteError, match=r"0\.0"):
        quantize_(net, StaticW8A8(), calib=[torch.randn(2, 1, 12, 12), bad])
    _assert_unchanged(net, before)


def test_no_quantizable_layer():
    with pytest.raises(LowbitError, match="no quantizable layer"):
        quantize_(nn.Sequential(nn.ReLU()), StaticW8A8(), calib=[torch.randn(2, 3)])


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_constant_activations_are_exact(act):
    """Observers that saw one constant give qparams that carry it exactly, input and output."""
    lin = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        lin[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        lin[0].bias.zero_()
    x = torch.full((2, 4), 0.75)
    quantize_(lin, StaticW8A8(activation_format=act), calib=[x])
    with torch.no_grad():
        assert torch.equal(lin(x), torch.full((2, 1), 0.75))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation_format": "int4"}, "activation_format"),
        ({"weight_observer": "kl"}, "weight_observer"),
        ({"percentile": 20.0}, "percentile"),
        ({"observer": "median"}, "unknown observer"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        StaticW8A8(**kwargs)


def test_nothing_selected_leaves_the_model_unfolded():
    net = _cnn()
    before = _snapshot(net)
    with pytest.raises(LowbitError, match="no quantizable layer"):
        quantize_(net, StaticW8A8(), calib=_batches(), exclude=["*"])
    _assert_unchanged(net, before)
