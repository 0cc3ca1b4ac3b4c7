"""Learned weight rounding after StaticW8A8 calibration (``rounding="adaround"``: layer by layer,
``"brecq"``: block by block with QDrop) on a small random-weight CNN: BatchNorm, ReLU6, a depthwise conv,
residual ``Add`` modules inside blocks, global pooling and a Linear head (seeded, single-threaded).

Exact: the result is the nearest-rounding model with other codes (same modules, activation qparams and
weight scales; codes one step away at most), it saves, loads and exports; the stand-ins compute what the
static layers compute; units are found as documented; each unit's target is what the unit computes.
Quality: on int4 weights BRECQ and AdaRound lower the model's output error (measured ratios in the
tests). Options and old configs. (Random weights: correctness tests, not accuracy claims.)"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QStaticConv2d, QStaticLinear, StaticW8A8, quantize_
from lowbit.core.codec import decode
from lowbit.nn import Add, QStaticAdd
from lowbit.transforms import config_from_dict
from lowbit.transforms import reconstruct as recon
from lowbit.transforms.reconstruct import MAX_BLOCK_LAYERS, Reconstruction, _SimAdd, _SimLayer, _units

STATIC = (QStaticConv2d, QStaticLinear)
LAYERS = [
    "stem.0",
    *(f"blocks.{b}.conv.{i}" for b in (0, 1) for i in (0, 3, 6)),
    "fc",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convs: single-threaded is ~10x faster on a shared 2-core machine (see tests/observers);
    module scope, so that the module-scoped model fixtures run under it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    """MobileNetV2-style inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, skip as an ``Add``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        e = 2 * c
        self.conv = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
            nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip
        self.add = Add()

    def forward(self, x):
        return self.add(x, self.conv(x))


class Net(nn.Module):
    """Stem (conv, BN, ReLU6), two blocks (6 layers: more than MAX_BLOCK_LAYERS together), pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.stem = nn.Sequential(stem, nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _net(seed: int = 0) -> Net:
    """Random weights and BatchNorm statistics (so that folding changes the convs), eval mode."""
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 100)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(0.6 * torch.rand(c, generator=g) - 0.3)
    return net.eval()


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def _static(net: nn.Module) -> dict[str, nn.Module]:
    return {f: m for f, m in net.named_modules() if isinstance(m, STATIC)}


def _codes(q: nn.Module) -> torch.Tensor:
    return decode(q.qweight, q.spec.fmt, q.cols).int()


def _quantized(config: StaticW8A8, seed: int = 0, calib=None):
    net = _net(seed)
    return net, quantize_(net, config, calib=calib if calib is not None else _batches())


@pytest.fixture(scope="module")
def runs():
    """rounding -> (model, summary): int8 weights, 20 reconstruction steps per unit (~1 s each)."""
    return {r: _quantized(StaticW8A8(rounding=r, recon_steps=20)) for r in ("nearest", "adaround", "brecq")}


@pytest.fixture(scope="module")
def int4():
    """(calibration batches, nearest, brecq model, brecq summary): int4 weights, no bias correction."""
    calib = _batches(3)
    nearest, _ = _quantized(StaticW8A8(weight_bits=4, bias_correction=False), calib=calib)
    brecq, summary = _quantized(
        StaticW8A8(weight_bits=4, bias_correction=False, rounding="brecq", recon_steps=200), calib=calib
    )
    return calib, nearest, brecq, summary


def _output_mse(net: nn.Module, calib: list[torch.Tensor]) -> float:
    """Mean squared error of ``net``'s outputs against the float model's on ``calib``."""
    ref = _net()
    with torch.no_grad():
        return sum(float((net(x) - ref(x)).pow(2).mean()) for x in calib) / len(calib)


# -- the result is the nearest-rounding model with other codes ---------------------------------------------


@pytest.mark.parametrize("rounding", ["adaround", "brecq"])
def test_learned_rounding_changes_codes_only(runs, rounding):
    near, near_summary = runs["nearest"]
    net, summary = runs[rounding]
    assert {f: type(m) for f, m in net.named_modules()} == {f: type(m) for f, m in near.named_modules()}
    assert summary.quantized == near_summary.quantized and summary.fused == near_summary.fused
    assert summary.folded == near_summary.folded and summary.stretched == near_summary.stretched
    assert list(_static(net)) == LAYERS
    adds = [f for f, m in net.named_modules() if isinstance(m, QStaticAdd)]
    assert adds == ["blocks.0.add", "blocks.1.add"]
    for f, m in net.named_modules():
        if not isinstance(m, (*STATIC, QStaticAdd)):
            continue
        ref = near.get_submodule(f)
        for name in ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "scale"):
            if hasattr(ref, name):
                assert torch.equal(getattr(m, name), getattr(ref, name)), (f, name)
        if isinstance(m, STATIC):
            assert m.spec == ref.spec and m.requantize_output == ref.requantize_output
            assert m.zero_point is None or torch.equal(m.zero_point, ref.zero_point)
            # learned rounding starts after bias correction (configs.py) and keeps its biases
            assert torch.equal(m.bias, ref.bias), f


@pytest.mark.parametrize("rounding", ["adaround", "brecq"])
def test_codes_move_one_step_on_few_weights(runs, rounding):
    near, _ = runs["nearest"]
    net, summary = runs[rounding]
    moved, total = 0, 0
    for f, q in _static(net).items():
        diff = (_codes(q) - _codes(near.get_submodule(f))).abs()
        assert int(diff.max()) <= 1, f
        frac = float((diff > 0).float().mean())
        assert f"{100 * frac:.1f}% rounded away from nearest" in summary.rounded[f]
        moved, total = moved + int((diff > 0).sum()), total + diff.numel()
    # a unit whose learned rounding fits worse than nearest keeps nearest (short runs here: 20 steps)
    assert 0 <= moved < 0.2 * total


@pytest.mark.parametrize("rounding", ["adaround", "brecq"])
def test_summary_lists_every_static_layer(runs, rounding):
    net, summary = runs[rounding]
    assert list(summary.rounded) == LAYERS
    assert all(v.startswith(f"{rounding}, ") for v in summary.rounded.values())
    assert f"learned rounding: {len(LAYERS)} layers ({rounding}, " in str(summary)
    assert runs["nearest"][1].rounded == {}


def test_save_load_round_trip(runs, tmp_path):
    net, _ = runs["brecq"]
    lowbit.save(net, tmp_path / "brecq")
    back = lowbit.load(tmp_path / "brecq", model=_net())
    assert {f: type(m) for f, m in back.named_modules()} == {f: type(m) for f, m in net.named_modules()}
    for f, q in _static(net).items():
        assert torch.equal(_codes(back.get_submodule(f)), _codes(q))
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_quantize_under_no_grad_and_inference_mode(mode):
    """Reconstruction turns gradients back on: the same codes as a plain call (5 steps per unit)."""
    config = StaticW8A8(rounding="brecq", recon_steps=5)
    plain, _ = _quantized(config)
    with getattr(torch, mode)():
        net, summary = _quantized(config)
    assert list(summary.rounded) == LAYERS
    for f, q in _static(net).items():
        assert torch.equal(_codes(q), _codes(plain.get_submodule(f))), f
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


# -- quality -------------------------------------------------------------------------------------------


def test_brecq_lowers_the_int4_output_error(int4):
    """Output MSE against the float model on its 3 calibration batches, int4 weights, no bias correction
    (so that only the rounding differs), 200 steps per unit: BRECQ / nearest = 0.66 (measured; seeds 0-3
    of this net: 0.66, 0.22, 0.23, 0.15; 100 steps: 0.24-0.88)."""
    calib, nearest, brecq, _ = int4
    assert _output_mse(brecq, calib) < 0.9 * _output_mse(nearest, calib)


def test_adaround_lowers_the_int4_output_error(int4):
    """As above with AdaRound (layer by layer, no QDrop): AdaRound / nearest = 0.51 (measured; seeds 0-3:
    0.51, 0.28, 0.34, 0.32)."""
    calib, nearest, _, _ = int4
    adaround, _ = _quantized(
        StaticW8A8(weight_bits=4, bias_correction=False, rounding="adaround", recon_steps=200), calib=calib
    )
    assert _output_mse(adaround, calib) < 0.9 * _output_mse(nearest, calib)


def test_weight_bits_4_gives_int4_weights(int4):
    _, nearest, brecq, summary = int4
    for net in (nearest, brecq):
        assert {f: q.spec.format for f, q in _static(net).items()} == dict.fromkeys(LAYERS, "int4")
        assert all(int(_codes(q).abs().max()) <= 7 for q in _static(net).values())
    assert all(re.search(r"\bint4\b", summary.quantized[f]) for f in LAYERS)


def test_int4_weights_export_to_onnx(int4, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    from lowbit.export import export_onnx
    from support import assert_ort_matches

    net = int4[2]  # brecq
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    path = export_onnx(net, x[:1], tmp_path / "w4.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for f, q in _static(net).items():  # the learned codes, on int8 initializers within int4's range
        w = torch.from_numpy(inits[f"{f}.weight_quantized"].copy())
        if w.dim() == 4:
            w = w[:, : q.weight_shape[1]]  # input channels padded to a multiple of 4 (see tests/export)
        assert torch.equal(w.reshape(q.rows, -1).int(), _codes(q)) and int(w.abs().max()) <= 7, f
    with torch.no_grad():
        ours = net(x).numpy()
    ref = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
    # float requantization in the reference vs lowbit's fixed point: a tie one code away somewhere
    # (measured 2.3e-4 of the output's range; 0 before the pooled head)
    assert np.abs(ref - ours).max() <= 1e-3 * np.abs(ours).max()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_ort_matches(sess.run(None, {"input": x.numpy()})[0], ours, 0.05 * np.abs(ours).max())


# -- the stand-ins and the units --------------------------------------------------------------------------


def _inputs(net: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Arguments each static layer and add of ``net`` receives on ``x``."""
    seen, hooks = {}, []
    for f, m in net.named_modules():
        if isinstance(m, (*STATIC, QStaticAdd)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, f=f: seen.__setitem__(f, args)))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def test_stand_ins_compute_what_the_static_layers_compute(runs):
    """At their codes (hard mode), ``_SimLayer``/``_SimAdd`` give the static layers' outputs: exact up to
    a tie (fake quantization multiplies by 1 / scale, the kernels divide) one output code away."""
    near, _ = runs["nearest"]
    args = _inputs(near, _batches(1, seed=3)[0])
    for f, q in _static(near).items():
        shape = q.weight_shape if isinstance(q, QStaticConv2d) else (q.rows, q.cols)
        w = q.dequantized_weight().reshape(shape)
        sim = _SimLayer(q, w, q.scale, f).eval()
        sim.rounding.hard_mode = True
        assert torch.equal(sim.rounding.codes().int(), _codes(q)), f
        with torch.no_grad():
            got, want = sim(*args[f]), q(*args[f])
        if q.requantize_output:
            step = float(q.output_scale)
            off = (got - want).abs()
            assert float(off.max()) <= 1.001 * step and float((off > 1e-6).float().mean()) < 0.01, f
        else:  # the stand-in adds the bias on the int32 grid, the float-output kernel adds it as is
            grid = float((q.input_scale.double() * q.scale.double()).max())
            assert float((got - want).abs().max()) <= grid / 2 + 1e-6 * float(want.abs().max()), f
    for f in ("blocks.0.add", "blocks.1.add"):
        q = near.get_submodule(f)
        with torch.no_grad():
            off = (_SimAdd(q).eval()(*args[f]) - q(*args[f])).abs()
        assert float(off.max()) <= 1.001 * float(q.output_scale), f


def test_units_layer_and_block():
    net = _net()
    layers = {f for f, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert _units(net, layers, "layer") == LAYERS  # module order
    assert MAX_BLOCK_LAYERS == 4
    # the stem and the head hold one layer each; "blocks" holds 6 > 4 and splits into its two blocks
    assert _units(net, layers, "block") == ["stem", "blocks.0", "blocks.1", "fc"]
    quantized = _static(_quantized(StaticW8A8())[0])  # the same on the static model's names
    assert _units(_net(), set(quantized), "block") == ["stem", "blocks.0", "blocks.1", "fc"]


@pytest.mark.parametrize(
    ("sizes", "want"),
    [
        ((1, 1, 1, 1, 1), ["0", "1", "2", "3", "4"]),  # 5 layers: each child
        ((2, 2), ["0", "1"]),  # the root is never a unit
        ((3, (1, 1), 1), ["0", "1", "2"]),  # a nested Sequential of 2 layers is one unit
        (((4, 1),), ["0.0", "0.1"]),  # 5 layers in one child: split again
        ((0, 2), ["1"]),  # a child without layers is no unit
    ],
    ids=["flat", "root", "nested", "split", "empty"],
)
def test_units_are_the_outermost_modules_with_at_most_four_layers(sizes, want):
    def build(spec):
        if isinstance(spec, int):
            return nn.Sequential(*(nn.Linear(2, 2) for _ in range(spec))) if spec != 1 else nn.Linear(2, 2)
        return nn.Sequential(*(build(s) for s in spec))

    net = build(sizes)
    layers = {f for f, m in net.named_modules() if isinstance(m, nn.Linear)}
    units = _units(net, layers, "block")
    assert units == want
    owned = [f for f in layers for u in units if f == u or f.startswith(u + ".")]
    assert sorted(owned) == sorted(layers)  # every layer in exactly one unit


def _unit_errors(monkeypatch, net, config, calib) -> dict[str, float]:
    """unit -> relative squared error against its reconstruction target of the unit's stand-in at init
    (soft rounding = the float weights; no dropping) on the inputs it trains on: the quantized model's,
    and with QDrop the float model's too. Activation quantization noise only (<= 2e-4) when the target
    is what the unit computes."""
    errors, fit = {}, recon._fit_unit

    def spy(model, teacher, unit, out, members, calib, opts, gen):
        x_fp, target = recon._capture(teacher, unit, out, calib, gen.device)
        x_q, _ = recon._capture(model, unit, None, calib, gen.device)
        run = model.get_submodule(unit) if out == unit else recon._through(model, unit, out)
        for m in members:
            m.eval()
        with torch.no_grad():
            inputs = (x_q, x_fp) if opts.drop > 0 else (x_q,)
            errors[unit] = max(float((run(x) - target).pow(2).mean() / target.pow(2).mean()) for x in inputs)
        return fit(model, teacher, unit, out, members, calib, opts, gen)

    monkeypatch.setattr(recon, "_fit_unit", spy)
    quantize_(net, config, calib=calib)
    return errors


def _relu6_chain() -> nn.Sequential:
    """conv -> ReLU6 -> depthwise -> ReLU6 -> conv, no BatchNorm: a stretch_relu6 pair (0, 2)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip


def _chain_calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def test_unit_targets_are_what_the_units_compute(monkeypatch):
    """BRECQ blocks on the CNN, AdaRound layers on a chain without BatchNorm, stretching or equalization:
    each unit's target is its own output (measured <= 1.9e-4)."""
    errors = _unit_errors(monkeypatch, _net(), StaticW8A8(rounding="brecq", recon_steps=1), _batches())
    assert list(errors) == ["stem", "blocks.0", "blocks.1", "fc"] and max(errors.values()) < 1e-2, errors
    config = StaticW8A8(rounding="adaround", recon_steps=1, stretch_relu6=False)
    errors = _unit_errors(monkeypatch, _relu6_chain(), config, _chain_calib())
    assert list(errors) == ["0", "2", "4"] and max(errors.values()) < 1e-2, errors


def test_adaround_target_of_a_conv_before_a_folded_batchnorm(monkeypatch):
    config = StaticW8A8(rounding="adaround", recon_steps=1, stretch_relu6=False)
    errors = _unit_errors(monkeypatch, _net(), config, _batches())
    assert list(errors) == LAYERS and max(errors.values()) < 1e-2, errors


def _relu6_blocks() -> nn.Sequential:
    """``_relu6_chain`` with (conv, ReLU6) and (depthwise, ReLU6) in two Sequentials: two BRECQ units."""
    chain = _relu6_chain()
    return nn.Sequential(chain[0:2], chain[2:4], chain[4]).eval()


@pytest.mark.parametrize(
    ("build", "options", "units"),
    [
        (_relu6_chain, {"rounding": "adaround"}, ["0", "2", "4"]),
        (_relu6_chain, {"rounding": "adaround", "stretch_relu6": False, "equalize": True}, ["0", "2", "4"]),
        (_relu6_blocks, {"rounding": "brecq"}, ["0", "1", "2"]),
    ],
    ids=["adaround-stretch_relu6", "adaround-equalize", "brecq-stretch_relu6-across-units"],
)
def test_targets_after_rescaling(monkeypatch, build, options, units):
    errors = _unit_errors(monkeypatch, build(), StaticW8A8(recon_steps=1, **options), _chain_calib())
    assert list(errors) == units and max(errors.values()) < 1e-2, errors


def test_qdrop_drops_inside_units_while_training(monkeypatch):
    seen, fq = [], recon._Dropper.fq

    def spy(self, x, side):
        seen.append((self.training, self.drop))
        return fq(self, x, side)

    monkeypatch.setattr(recon._Dropper, "fq", spy)
    _quantized(StaticW8A8(rounding="brecq", recon_steps=3, recon_drop=0.5), calib=_batches(2))
    assert any(drop == 0.5 for _, drop in seen)
    assert all(training for training, drop in seen if drop == 0.5)


def test_learned_rounding_is_never_worse_than_nearest_on_its_unit(monkeypatch):
    """On each unit's own captured data (hard codes, every quantization on) the kept rounding's loss is
    at most round-to-nearest's: a worse one is reset to nearest."""
    losses, fit = {}, recon._fit_unit

    def spy(model, teacher, unit, out, members, calib, opts, gen):
        fit(model, teacher, unit, out, members, calib, opts, gen)
        _, target = recon._capture(teacher, unit, out, calib, gen.device)
        x_q, _ = recon._capture(model, unit, None, calib, gen.device)
        run = model.get_submodule(unit) if out == unit else recon._through(model, unit, out)
        layers = [m for m in members if isinstance(m, _SimLayer)]
        kept = recon._unit_loss(run, members, layers, x_q, target, opts.batch)
        learned = [m.rounding.v.detach().clone() for m in layers]
        for m in layers:
            m.rounding.reset()
        nearest = recon._unit_loss(run, members, layers, x_q, target, opts.batch)
        with torch.no_grad():
            for m, v in zip(layers, learned, strict=True):
                m.rounding.v.copy_(v)
        losses[unit] = (kept, nearest)

    monkeypatch.setattr(recon, "_fit_unit", spy)
    _quantized(StaticW8A8(weight_bits=4, rounding="brecq", recon_steps=30), calib=_batches(2))
    assert list(losses) == ["stem", "blocks.0", "blocks.1", "fc"]
    assert all(kept <= nearest for kept, nearest in losses.values()), losses


# -- options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 1}, r"weight_bits must be 2..8, got 1"),
        ({"weight_bits": 9}, r"weight_bits must be 2..8, got 9"),
        ({"rounding": "foo"}, r"rounding must be 'nearest', 'adaround' or 'brecq', got 'foo'"),
        ({"recon_steps": 0}, r"recon_steps must be >= 1"),
        ({"recon_drop": 1.0}, r"recon_drop in \[0, 1\), got 500, 1.0"),
        ({"recon_drop": -0.1}, r"recon_drop in \[0, 1\)"),
    ],
    ids=["bits-1", "bits-9", "rounding-foo", "steps-0", "drop-1", "drop-negative"],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        StaticW8A8(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "x"}, r"granularity must be one of \('layer', 'block'\), got 'x'"),
        ({"steps": 0}, r"steps >= 1"),
        ({"batch": 0}, r"batch >= 1"),
        ({"lr": 0.0}, r"lr > 0"),
        ({"drop": 1.0}, r"drop must be in \[0, 1\), got 1.0"),
    ],
    ids=["granularity", "steps", "batch", "lr", "drop"],
)
def test_bad_reconstruction_is_named(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        Reconstruction(**kwargs)


def test_weight_bits_give_int_codes_of_that_width():
    net, summary = _quantized(StaticW8A8(weight_bits=3, stretch_relu6=False), calib=_batches(2))
    assert {q.spec.format for q in _static(net).values()} == {"int3"}
    assert all(int(_codes(q).abs().max()) <= 3 for q in _static(net).values())
    assert all(re.search(r"\bint3\b", summary.quantized[f]) for f in LAYERS)


def test_version_3_config_loads_as_nearest_int8():
    c = StaticW8A8(weight_bits=4, rounding="brecq", recon_steps=7, recon_drop=0.25, recon_device="cpu")
    assert config_from_dict(c.to_dict()) == c and c.version == 5
    new = ("weight_bits", "rounding", "recon_steps", "recon_drop", "recon_device", "layer_bits")
    v3 = {k: v for k, v in StaticW8A8().to_dict().items() if k not in new} | {"version": 3}
    old = config_from_dict(v3)
    assert old.rounding == "nearest" and old.weight_bits == 8 and old.stretch_relu6 is True
    assert old == StaticW8A8(version=3)


def test_recon_device_runs_where_asked():
    config = StaticW8A8(rounding="adaround", recon_steps=2, recon_device="cpu")
    net, summary = _quantized(config, calib=_batches(2))
    assert list(summary.rounded) == LAYERS
    assert all(q.qweight.device.type == "cpu" for q in _static(net).values())


def test_static_schemes_take_learned_rounding():
    """``w<b>a8-static`` with ``--method adaround|brecq`` (the CLI's parse)."""
    from lowbit.transforms.schemes import parse_scheme

    assert parse_scheme("w8a8-static") == StaticW8A8()
    assert parse_scheme("w4a8-static", "brecq") == StaticW8A8(weight_bits=4, rounding="brecq")
    assert parse_scheme("w3a8-static", "adaround") == StaticW8A8(weight_bits=3, rounding="adaround")
    with pytest.raises(LowbitError, match="does not apply"):
        parse_scheme("w4g128", "brecq")
    with pytest.raises(LowbitError, match="weight bits must be 2..8"):
        parse_scheme("w9a8-static")
