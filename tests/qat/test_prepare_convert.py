"""lowbit.qat.prepare / convert on small random-weight nets: which layers become training twins, step 0
against the float model, calibrated activation ranges, simulated BatchNorm folding, converted layers
against the fake-quantized model, save/load, ONNX, and every bad input named. (Random weights: these test
the mechanics, not accuracy.)"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import LowbitError, QLinear, QStaticConv2d, QStaticLinear, WeightOnly, quantize_
from lowbit.core.spec import PerTensor, QuantSpec
from lowbit.kernels.integer import weight_values
from lowbit.observers import make_observer
from lowbit.qat import QATConfig, QATConv2d, QATConvBn2d, QATLinear, convert, fake_quantizers, prepare
from support import assert_ort_matches


class TinyCNN(nn.Sequential):
    """Conv+BN+ReLU, depthwise conv+BN+ReLU, grouped 1x1 conv+ReLU, pooling, Linear head; random weights
    and BatchNorm statistics (seed 0), eval mode."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Conv2d(8, 16, 1, groups=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
        with torch.no_grad():
            for bn in (self[0][1], self[1][1]):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        self.eval()


class MLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.eval()


def _batches(n=3, seed=1, shape=(8, 3, 12, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _x(shape=(16, 3, 12, 12), seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _prepared(config=None, **kw):
    net = TinyCNN()
    summary = prepare(net, config or QATConfig(**kw), calib=_batches())
    return net, summary


@torch.no_grad()
def _as_if_trained(model, seed=3):
    """Move every learned qparam off its initial value, as training would (scales by up to +-10%, in the
    log domain where they are learned; zero points off the grid)."""
    g = torch.Generator().manual_seed(seed)
    for fq in fake_quantizers(model).values():
        fq.log_scale.add_(torch.log1p(0.2 * (torch.rand(fq.log_scale.shape, generator=g) - 0.5)))
        if fq.zero_point is not None and fq.mode == "lsq+":
            fq.zero_point.add_(torch.rand(fq.zero_point.shape, generator=g) - 0.5)


# ---------------------------------------------------------------- prepare


def test_prepare_swaps_layers_and_folds_batchnorm():
    net = TinyCNN()
    weights = [net[0][0].weight, net[1][0].weight, net[2].weight, net[6].weight]
    summary = prepare(net, QATConfig(weights="int4", activation_bits=4), calib=_batches())
    assert type(net[0][0]) is QATConvBn2d and type(net[1][0]) is QATConvBn2d  # depthwise one included
    assert type(net[2]) is QATConv2d and type(net[6]) is QATLinear  # grouped conv; Linear head
    assert isinstance(net[0][1], nn.Identity) and isinstance(net[1][1], nn.Identity)
    assert summary.folded == {"0.1": "0.0", "1.1": "1.0"}
    assert set(summary.quantized) == {"0.0", "1.0", "2", "6"} and summary.pact_fallback == {}
    assert [net[0][0].weight, net[1][0].weight, net[2].weight, net[6].weight] == weights  # shared, not copied
    assert net.lowbit_qat["weights"] == "int4" and net.lowbit_identity == ["0.1", "1.1"]
    assert net[2].weight_fq.scale.shape == (16, 1) and net[2].input_fq.scale.shape == ()
    assert all(bool(fq.initialized) for fq in fake_quantizers(net).values())


def test_step_zero_is_close_to_the_float_model():
    """8-bit weights and activations at step 0 (eval mode): a post-training quantized model."""
    x = _x()
    with torch.no_grad():
        ref = TinyCNN()(x)
        net, _ = _prepared(weights="int8", activation_bits=8)
        out = net(x)
    # measured: max |diff| 0.0030 for outputs up to 0.41
    assert (out - ref).abs().max() < 0.01
    assert not net.training


def test_activation_ranges_come_from_calibration():
    """The first layer reads the calibration batches themselves: its input qparams are the observer's
    over them; every other input quantizer is initialised too."""
    calib = _batches()
    net = TinyCNN()
    prepare(net, QATConfig(weights="int8", activation_bits=8, observer="minmax"), calib=calib)
    obs = make_observer("minmax", QuantSpec("uint8", False, PerTensor(), "float32"), name="x")
    for b in calib:
        obs.update(b)
    scale, zp = obs.qparams()
    got_scale, got_zp = net[0][0].input_fq.qparams()
    # stored as log(scale): exp(log(s)) comes back within a few ulps
    torch.testing.assert_close(got_scale, scale.reshape(()), rtol=1e-6, atol=0)
    assert torch.equal(got_zp, zp.reshape(()))
    lo = min(float(b.min()) for b in calib)
    assert float(got_zp) == round(-lo / float(scale))
    assert all(float(m.input_fq.qparams()[0]) > 0 for m in (net[1][0], net[2], net[6]))


def test_pact_falls_back_to_lsq_plus_where_inputs_go_negative():
    """The first layer reads signed pixels: lsq+; the others read ReLU outputs: PACT, zero point 0 and
    alpha = scale * qmax = the calibrated maximum."""
    net, summary = _prepared(weights="int4", activation_bits=4, activation_learning="pact", observer="minmax")
    assert list(summary.pact_fallback) == ["0.0"]
    assert "lsq+ instead of pact" in summary.pact_fallback["0.0"]
    assert net[0][0].input_fq.mode == "lsq+" and float(net[0][0].input_fq.zero_point.detach()) > 0
    for m in (net[1][0], net[2], net[6]):
        assert m.input_fq.mode == "pact" and float(m.input_fq.zero_point.detach()) == 0.0


def test_prepare_leaves_the_model_as_it_was_on_error():
    net = TinyCNN()
    with pytest.raises(LowbitError, match=r"calibration batch 0 \(tensor \(2, 5, 12, 12\) float32\)"):
        prepare(net, QATConfig(), calib=[torch.randn(2, 5, 12, 12)])
    assert type(net[0][0]) is nn.Conv2d and type(net[0][1]) is nn.BatchNorm2d and type(net[6]) is nn.Linear
    assert not hasattr(net, "lowbit_qat") and not fake_quantizers(net)


def test_exclude_keeps_a_layer_float():
    net = TinyCNN()
    summary = prepare(net, QATConfig(), calib=_batches(), exclude=("6",))
    assert type(net[6]) is nn.Linear and "6" not in summary.quantized
    convert(net)
    assert type(net[6]) is nn.Linear and type(net[2]) is QStaticConv2d


# ---------------------------------------------------------------- simulated BatchNorm folding


def _folded(twin):
    """``(W', b')`` by hand from the conv and BatchNorm parameters (in float64, as the fold rule computes
    it, then float32)."""
    bn = twin.bn
    factor = torch.rsqrt(bn.running_var.double() + bn.eps) * bn.weight.double()
    weight = twin.weight.double() * factor.reshape(-1, 1, 1, 1)
    bias = (twin.bias.double() - bn.running_mean.double()) * factor + bn.bias.double()
    return weight.float(), bias.float()


def _on_grid(twin, bias):
    """``bias`` rounded to multiples of ``x_scale * w_scale[c]`` (the int32 bias grid), by hand from the
    deployable qparams: ``(snapped bias, integer multiples k)``."""
    step = twin.input_fq.qparams()[0] * twin.weight_fq.qparams()[0].reshape(-1)
    k = torch.round(bias / step)
    return k * step, k


@pytest.mark.parametrize("conv", ["0.0", "1.0"], ids=["dense", "depthwise"])
def test_conv_bn_eval_and_frozen_forward_is_the_folded_conv(conv):
    """Eval mode, and train mode with statistics frozen: ``conv2d(fq(x), fq(W'), b')`` with ``b'`` on the
    int32 grid of ``x_scale * w_scale[c]`` (``integer_bias``), nothing updated."""
    net, _ = _prepared(weights="int4", activation_bits=4)
    twin = net.get_submodule(conv)
    x = _x((4, 3, 12, 12)) if conv == "0.0" else torch.rand(4, 8, 6, 6)
    weight, bias = _folded(twin)
    dw, db = twin.deploy_weight()
    torch.testing.assert_close(dw, weight, rtol=0, atol=0)
    torch.testing.assert_close(db, bias, rtol=0, atol=0)  # deploy_weight: b' before snapping
    snapped, _ = _on_grid(twin, bias)
    assert not torch.equal(snapped, bias)  # 4-bit steps: the snapping moves b'
    args = {k: twin.conv[k] for k in ("stride", "padding", "dilation", "groups")}
    with torch.no_grad():
        assert torch.equal(twin.integer_bias(bias), snapped)
        expected = F.conv2d(twin.input_fq(x), twin.quantized_weight(weight), snapped, **args)
        assert torch.equal(twin(x), expected)
        twin.train()
        twin.freeze_bn()
        stats = {k: v.clone() for k, v in twin.bn.state_dict().items()}
        assert torch.equal(twin(x), expected)
    assert all(torch.equal(v, stats[k]) for k, v in twin.bn.state_dict().items())


def test_conv_bn_statistics_update_in_training_until_frozen():
    net, _ = _prepared(weights="int8", activation_bits=8)
    twin = net[0][0]
    x = _x((8, 3, 12, 12))
    mean0 = twin.bn.running_mean.clone()
    net.train()
    with torch.no_grad():
        y = twin(x)
        conv = F.conv2d(twin.input_fq(x), twin.weight, twin.bias, padding=1)  # float weights, same input
        float_y = F.batch_norm(conv, None, None, twin.bn.weight, twin.bn.bias, training=True)
    assert not torch.equal(twin.bn.running_mean, mean0) and int(twin.bn.num_batches_tracked) == 1
    # training forward = conv, then BatchNorm on the batch statistics; int8 weights: measured max |diff|
    # 0.020 for outputs up to 6.0
    assert (y - float_y).abs().max() < 0.05
    net[0][0].freeze_bn()
    mean1, var1 = twin.bn.running_mean.clone(), twin.bn.running_var.clone()
    with torch.no_grad():
        twin(x)
    assert torch.equal(twin.bn.running_mean, mean1) and torch.equal(twin.bn.running_var, var1)
    assert int(twin.bn.num_batches_tracked) == 1


# ---------------------------------------------------------------- convert

CONFIGS = {
    "w8a8": QATConfig(weights="int8", activation_bits=8),
    "w4a4": QATConfig(weights="int4", activation_bits=4),
    "w4a4-symmetric": QATConfig(weights="int4", activation_bits=4, activation_symmetric=True),
    "w4a4-pact": QATConfig(weights="int4", activation_bits=4, activation_learning="pact"),
    "w2a8-minmax": QATConfig(weights="int2", activation_bits=8, weight_observer="minmax"),
    "ternary-a4": QATConfig(weights="ternary", activation_bits=4),
    "binary-a8": QATConfig(weights="binary", activation_bits=8),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_convert_matches_the_fake_quantized_model(config):
    net, _ = _prepared(config)
    _as_if_trained(net)
    x = _x()
    with torch.no_grad():
        fake = net(x)
        layers = {f: net.get_submodule(f) for f in ("0.0", "1.0", "2", "6")}
        twins = {
            f: (m.quantized_weight(m.deploy_weight()[0]), m.input_fq.qparams()) for f, m in layers.items()
        }
    summary = convert(net)
    assert set(summary.quantized) == set(twins) and not fake_quantizers(net)
    assert not hasattr(net, "lowbit_qat") and net.lowbit_config["weights"] == config.weights
    for fqn, (fq_weight, (in_scale, in_zp)) in twins.items():
        q = net.get_submodule(fqn)
        assert type(q) is (QStaticLinear if fqn == "6" else QStaticConv2d) and not q.requantize_output
        # the deployed integer weights are the fake-quantized ones, code for code
        rows = fq_weight.reshape(fq_weight.shape[0], -1)
        assert torch.equal((weight_values(q) * q.scale.double().reshape(-1, 1)).float(), rows)
        assert torch.equal(q.input_scale, in_scale)
        assert int(q.input_zero_point) == (int(in_zp) if in_zp is not None else 0)
    with torch.no_grad():
        out = net(x)
    # same codes; only float32 summation order differs: measured max |diff| <= 6e-8 (outputs ~0.4)
    assert (out - fake).abs().max() < 1e-6


@pytest.mark.parametrize("weights", ["int4", "ternary", "binary"])
def test_weight_only_linear_model_converts_to_qlinear(weights):
    config = QATConfig(weights=weights, activation_bits=None, group_size=16)
    net = MLP()
    summary = prepare(net, config)  # no activation ranges: no calibration needed
    assert type(net[0]) is QATLinear and net[0].input_fq is None and net[0].weight_fq.scale.shape == (128, 1)
    _as_if_trained(net)
    x = _x((8, 32))
    with torch.no_grad():
        fake = net(x)
        fq_weight = net[2].quantized_weight(net[2].weight).clone()
    convert(net)
    assert type(net[0]) is QLinear and type(net[2]) is QLinear and set(summary.quantized) == {"0", "2"}
    assert net[2].scale.shape == (10, 4)
    assert torch.equal(net[2].dequantized_weight(), fq_weight)
    with torch.no_grad():
        out = net(x)
    assert (out - fake).abs().max() < 1e-6  # measured 0 here (same float ops)


def test_weight_only_keeps_convs_float():
    net = TinyCNN()
    summary = prepare(net, QATConfig(activation_bits=None))
    assert type(net[6]) is QATLinear and type(net[0][0]) is nn.Conv2d and type(net[0][1]) is nn.BatchNorm2d
    assert "convs stay float" in summary.skipped["0.0"] and not summary.folded


def test_converted_model_round_trips_through_save_and_load(tmp_path):
    net, _ = _prepared(weights="int4", activation_bits=4)
    _as_if_trained(net)
    convert(net)
    x = _x()
    lowbit.save(net, tmp_path / "w4a4")
    back = lowbit.load(tmp_path / "w4a4", model=TinyCNN())
    assert type(back[0][0]) is QStaticConv2d and isinstance(back[0][1], nn.Identity)
    assert not back[0][0].requantize_output and back[0][0].act_spec.format == "uint4"
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


@pytest.mark.parametrize("symmetric", [False, True], ids=["uint4", "int4"])
def test_onnx_export_of_4_bit_activations(tmp_path, symmetric):
    """4-bit codes travel as 8-bit QuantizeLinear outputs clipped to the 4-bit range. ONNX writes each
    bias as int32 codes of ``x_scale * w_scale``; the trained biases are on that grid already
    (``integer_bias``), so the graph adds exactly lowbit's bias and reproduces the converted model to
    float32 rounding (before the biases were snapped: up to 5e-4, half a bias step on the Gemm)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnx
    from onnx.reference import ReferenceEvaluator

    from lowbit.export import export_onnx

    net, _ = _prepared(weights="int4", activation_bits=4, activation_symmetric=symmetric)
    _as_if_trained(net)
    convert(net)
    x = _x()
    path = export_onnx(net, x[:1], tmp_path / "net.onnx", overwrite=True)
    with torch.no_grad():
        ours = net(x).numpy()
    # measured: max |diff| 3e-8 (uint4) / 6e-8 (int4), onnx.reference and ONNX Runtime, for outputs up
    # to 0.44 (1-2 float32 ulps); the last layer's input step is 0.05 / 0.11
    tol = 1e-6
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_ort_matches(sess.run(None, {"input": x.numpy()})[0], ours, tol)
    ref = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(ref - ours).max() <= tol
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Clip") == 4 and ops.count("QuantizeLinear") == 4
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    codes, scale = inits["6.bias_quantized"], inits["6.bias_scale"]  # the Gemm's int32 bias ...
    assert np.array_equal(codes.astype(np.float32) * scale, net[6].bias.numpy())  # ... is lowbit's, exactly
    for fqn in ("0.0", "1.0", "2"):  # float-output convs keep the float bias
        assert np.array_equal(inits[f"model.{fqn}.bias"], net.get_submodule(fqn).bias.numpy())


def test_bias_is_snapped_to_the_int32_grid_and_deployed_as_is():
    """With quantized inputs every twin's forward adds ``k * x_scale * w_scale[c]`` (``k`` integer: the
    int32 code ONNX and the integer kernels hold), straight-through to the float bias; ``convert`` stores
    exactly that bias, and the integer layer's int32 codes are ``k``."""
    from lowbit.kernels.integer import integer_params

    net, _ = _prepared(weights="int4", activation_bits=4)
    _as_if_trained(net)
    twins = {f: net.get_submodule(f) for f in ("0.0", "1.0", "2", "6")}
    fake = {}
    for fqn, twin in twins.items():
        raw = twin.deploy_weight()[1].detach().requires_grad_()  # conv-bn: the folded b'
        got = twin.integer_bias(raw)
        want, k = _on_grid(twin, raw.detach())
        assert torch.equal(got.detach(), want)
        step = twin.input_fq.qparams()[0].double() * twin.weight_fq.qparams()[0].double().reshape(-1)
        ratio = got.detach().double() / step  # k, up to two float32 roundings (step and k * step)
        assert torch.equal(torch.round(ratio), k.double())
        assert ((ratio - k.double()).abs() <= k.double().abs() * 2.0**-23).all()
        assert (got.detach() - raw.detach()).abs().le(step.float() / 2 * (1 + 1e-6)).all()  # half a step
        assert not torch.equal(got.detach(), raw.detach())
        got.sum().backward()  # straight-through: gradient 1 to the float bias
        assert torch.equal(raw.grad, torch.ones_like(raw))
        fake[fqn] = (got.detach().clone(), k)
    with torch.no_grad():  # the plain twins' forwards add it (QATConvBn2d: see the folding test)
        x = torch.rand(4, 8, 6, 6)
        conv = net[2]
        want = F.conv2d(conv.input_fq(x), conv.quantized_weight(conv.weight), fake["2"][0], groups=2)
        assert torch.equal(conv(x), want)
        x = torch.rand(4, 16)
        linear = net[6]
        want = F.linear(linear.input_fq(x), linear.quantized_weight(linear.weight), fake["6"][0])
        assert torch.equal(linear(x), want)
    convert(net)
    for fqn, (bias, k) in fake.items():
        q = net.get_submodule(fqn)
        assert torch.equal(q.bias, bias)
        assert torch.equal(integer_params(q)[0], k.long())


def test_bias_is_not_snapped_without_input_quantization():
    net = MLP()
    prepare(net, QATConfig(weights="int4", activation_bits=None))
    assert net[0].integer_bias(net[0].bias) is net[0].bias
    with torch.no_grad():
        fake = net(_x((8, 32)))
    convert(net)
    assert torch.equal(net[2].bias, MLP()[2].bias)
    with torch.no_grad():
        assert (net(_x((8, 32))) - fake).abs().max() < 1e-6


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": "int9"}, r"QAT weights must be one of int2, .*ternary, binary \(1-8 bits\), got 'int9'"),
        ({"weights": "int1"}, "got 'int1'"),
        ({"weights": "nf4"}, "got 'nf4'"),
        ({"activation_bits": 0}, "activation bits must be 1..8, got 0"),
        ({"activation_bits": 9}, "activation bits must be 1..8, got 9"),
        ({"activation_bits": 1, "activation_symmetric": True}, "symmetric activation bits must be 2..8"),
        ({"activation_bits": "uint4"}, "activation bits must be 1..8, got 'uint4'"),
        ({"activation_bits": True}, "activation bits must be 1..8, got True"),
        ({"group_size": 32}, r"group-wise weights need float activations \(activation_bits=None\)"),
        ({"activation_bits": None, "group_size": 0}, "group_size must be a positive integer or None, got 0"),
        ({"weight_learning": "pact"}, "weight_learning must be one of"),
        ({"activation_learning": "sgd"}, "activation_learning must be one of"),
        ({"activation_learning": "pact", "activation_symmetric": True}, r"clips to \[0, alpha\]"),
        ({"observer": "median"}, "unknown observer 'median'"),
        ({"weight_observer": "kl"}, "weight_observer must be 'mse' or 'minmax'"),
        ({"percentile": 40.0}, r"percentile must be in \(50, 100\]"),
        ({"freeze_bn_after": -1}, "freeze_bn_after must be >= 0 or None"),
    ],
    ids=[
        "int9", "int1", "nf4", "act0", "act9", "act1-symmetric", "act-str", "act-bool", "group-with-act",
        "group0", "weight-pact", "act-sgd", "pact-symmetric", "observer", "weight-observer", "percentile",
        "freeze",
    ],
)  # fmt: skip
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        QATConfig(**kwargs)


def test_convert_of_a_model_never_prepared():
    with pytest.raises(LowbitError, match=r"never prepared for QAT \(call lowbit.qat.prepare first\)"):
        convert(TinyCNN())


def test_prepare_twice():
    net, _ = _prepared()
    with pytest.raises(LowbitError, match=r"model is already prepared for QAT \(0.0 is a QATConvBn2d\)"):
        prepare(net, QATConfig(), calib=_batches())


def test_prepare_of_a_quantized_model():
    net = MLP()
    quantize_(net, WeightOnly(bits=4, group_size=16))
    with pytest.raises(LowbitError, match=r"already quantized \(0 is a QLinear\); prepare the float model"):
        prepare(net, QATConfig(activation_bits=None))
    net = MLP()
    net[2] = QStaticLinear(64, 10)
    with pytest.raises(LowbitError, match=r"model is already quantized \(2 is a QStaticLinear\)"):
        prepare(net, QATConfig(), calib=[torch.randn(4, 32)])
    assert type(net[0]) is nn.Linear


def test_prepare_needs_a_qat_config_and_calibration():
    with pytest.raises(LowbitError, match="lowbit.qat.prepare takes a QATConfig, got WeightOnly"):
        prepare(MLP(), WeightOnly())
    net = TinyCNN()
    with pytest.raises(LowbitError, match="needs calibration data: pass calib=batches"):
        prepare(net, QATConfig())
    assert type(net[6]) is nn.Linear


@pytest.mark.parametrize(
    ("log_scale", "match"),
    [(float("inf"), "2.weight: scale became inf"), (float("nan"), "2.weight: scale became nan"),
     (-200.0, r"2.weight: scale became 0 \(<= 0\)")],
    ids=["inf", "nan", "underflow"],
)  # fmt: skip
def test_convert_refuses_a_blown_up_scale(log_scale, match):
    net, _ = _prepared()
    with torch.no_grad():
        net[2].weight_fq.log_scale[3] = log_scale
    with pytest.raises(lowbit.NonFiniteError, match=match):
        convert(net)
    assert type(net[2]) is QATConv2d and type(net[0][0]) is QATConvBn2d and hasattr(net, "lowbit_qat")


def test_convert_after_deepcopy_is_independent():
    net, _ = _prepared()
    twin = copy.deepcopy(net)
    convert(twin)
    assert type(net[2]) is QATConv2d and type(twin[2]) is QStaticConv2d
