"""Learned per-layer bit widths (``QATConfig(bit_budget=...)``, ``lowbit.qat.bits``, FakeQuantizer mode
"bits"): the size penalty and its gradients, the integer allocation within the budget, ``fix_bits``
keeping the clipping range, resume across the fix, per-layer formats after ``convert``, and config
errors. Random weights and data: these test the mechanics, not accuracy."""

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LowbitError, QStaticConv2d, QStaticLinear
from lowbit.core.primitives import dequantize, quantize
from lowbit.core.spec import PerChannel, PerTensor, QuantSpec
from lowbit.qat import FakeQuantizer, Objective, QATConfig, TrainOptions, convert, prepare, shuffled, train
from lowbit.qat.bits import bit_penalty, fix_bit_widths, learned_bits, mean_bits
from lowbit.qat.modules import qat_modules
from lowbit.qat.trainer import BITS_LR_SCALE
from support import Crashing

COUNTS = {"0": 512, "2": 1024, "4": 128}  # weights per layer of _mlp
TOTAL = sum(COUNTS.values())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()  # fmt: skip


def _task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x @ torch.randn(16, 4, generator=g)).argmax(1)


def _prepared(budget=4.0, **kw):
    model = _mlp()
    config = QATConfig(weights="int4", activation_bits=8, bit_budget=budget, **kw)
    prepare(model, config, calib=[_task()[0][:64]])
    return model


def _set_bits(model, widths):
    """Learned widths by hand (``bit_width.data``)."""
    for fqn, b in widths.items():
        model.get_submodule(fqn).weight_fq.bit_width.data.fill_(b)


def _reference(fq, x):
    """quantize -> dequantize of ``x`` (rows, cols) per row with ``fq``'s spec and qparams (core
    primitives)."""
    scale, _ = fq.qparams()
    spec = QuantSpec(fq.spec.format, True, PerChannel(0), "float32")
    zp = torch.zeros(scale.shape, dtype=spec.fmt.torch_dtype)
    return dequantize(quantize(x, scale, zp, spec), scale, zp, spec)


def _bits_fq(bits=5.3, rows=64, seed=0):
    fq = FakeQuantizer(QuantSpec("int4", True, PerTensor(), "float32"), "bits", (rows, 1), "layer.weight")
    g = torch.Generator().manual_seed(seed)
    fq.set_qparams((torch.rand(rows, 1, generator=g) + 0.5) * 0.05, None)
    fq.bit_width.data.fill_(bits)
    return fq


def _x(seed=1, rows=64, cols=40):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the "bits" quantizer


def test_every_weight_quantizer_learns_its_width_from_the_starting_format():
    model = _prepared()
    assert list(learned_bits(model)) == ["0", "2", "4"]
    for fqn, (fq, n) in learned_bits(model).items():
        assert fq.mode == "bits" and n == COUNTS[fqn] and fq.bit_width.requires_grad
        assert float(fq.bit_width.detach()) == 4.0 and int(fq.fixed_bits) == 0
        assert model.get_submodule(fqn).input_fq.mode == "lsq+"  # activations as without a budget
    assert mean_bits(model) == 4.0


def test_bits_forward_and_its_gradient_to_the_bit_width():
    """``x' = round(clamp(x, -s L, s L) / s) s`` with ``L = 2^(b-1) - 1``; ``d x' / d b`` is
    ``sign(x) s ln2 2^(b-1)`` where ``x`` is clipped (the clipping range moves), 0 inside."""
    fq = _bits_fq(5.3)
    x = _x() * 0.3  # ranges +-0.025 * 18.7 .. +-0.075 * 18.7: 43 of 2560 inputs clipped
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    out = fq(x)
    scale = fq.qparams()[0]
    assert math.isclose(float(fq.levels().detach()), 2.0**4.3 - 1.0, rel_tol=1e-6)
    bound = scale * fq.levels().detach()
    assert torch.equal(
        out.detach(), torch.round(torch.maximum(torch.minimum(x, bound), -bound) / scale) * scale
    )
    clipped = x.abs() > bound
    assert clipped.any() and (~clipped).any()
    (out * w).sum().backward()
    expected = (w.double() * torch.sign(x).double() * clipped * scale.double()).sum() * math.log(2) * 2**4.3
    # float32 sum of the 43 clipped terms vs float64: measured relative error 8.8e-8
    assert math.isclose(float(fq.bit_width.grad), float(expected), rel_tol=1e-5)
    assert fq.log_scale.grad is not None


def test_fix_bits_keeps_the_clipping_range_and_continues_as_lsq():
    fq = _bits_fq(5.3)
    before = (fq.scale * fq.levels()).detach()
    fq.fix_bits(5)
    assert fq.mode == "lsq" and fq.spec.format == "int5" and (fq.qmin, fq.qmax) == (-16, 15)
    assert int(fq.fixed_bits) == 5 and not fq.bit_width.requires_grad and fq.bits() == 5
    # s' = s * L / 15 through log_scale: measured max relative error 2.4e-7
    torch.testing.assert_close(fq.scale.detach() * 15, before, rtol=1e-6, atol=0)
    x = _x() * 0.3
    assert torch.equal(fq(x), _reference(fq, x))  # int5 codes, the deployed qparams
    assert not learned_bits(nn.Sequential())  # nothing to learn in a model without twins
    with pytest.raises(LowbitError, match="layer.weight: bit width must be 2..8, got 9"):
        _bits_fq().fix_bits(9)


def test_bits_mode_needs_symmetric_int_weights():
    with pytest.raises(LowbitError, match="w: learned bit widths need symmetric int weights, got uint4"):
        FakeQuantizer(QuantSpec("uint4", False, PerTensor(), "float32"), "bits", (), "w")
    with pytest.raises(LowbitError, match="w: learned bit widths need symmetric int weights, got binary"):
        FakeQuantizer(QuantSpec("binary", True, PerTensor(), "float32"), "bits", (), "w")


# ---------------------------------------------------------------- penalty and allocation


def test_bit_penalty_is_the_weighted_mean_excess():
    """``relu(sum(b_i n_i) / sum(n_i) - budget)``; its gradient to layer i's width is ``n_i / sum(n)``
    above the budget, 0 below it, and 0 for a width outside 2..8 (clamped)."""
    model = _prepared()
    _set_bits(model, {"0": 5.0, "2": 3.0, "4": 6.0})  # mean 6400 / 1664 = 3.846
    mean = (5.0 * 512 + 3.0 * 1024 + 6.0 * 128) / TOTAL
    assert math.isclose(mean_bits(model), mean, rel_tol=1e-12)
    penalty = bit_penalty(model, 3.0)
    assert math.isclose(float(penalty.detach()), mean - 3.0, rel_tol=1e-6)
    penalty.backward()
    for fqn, n in COUNTS.items():
        grad = float(model.get_submodule(fqn).weight_fq.bit_width.grad)
        assert math.isclose(grad, n / TOTAL, rel_tol=1e-6), fqn
    model.zero_grad()
    below = bit_penalty(model, 4.0)
    assert float(below.detach()) == 0.0
    below.backward()
    assert all(float(model.get_submodule(f).weight_fq.bit_width.grad) == 0.0 for f in COUNTS)
    model.zero_grad()
    _set_bits(model, {"4": 9.5})  # counted as 8, no gradient past the clamp
    penalty = bit_penalty(model, 3.0)
    assert math.isclose(
        float(penalty.detach()), (5.0 * 512 + 3.0 * 1024 + 8.0 * 128) / TOTAL - 3.0, rel_tol=1e-6
    )
    penalty.backward()
    assert float(model[4].weight_fq.bit_width.grad) == 0.0 and float(model[0].weight_fq.bit_width.grad) > 0


def test_bit_penalty_is_a_term_of_the_objective_while_widths_are_learned():
    model = _prepared(budget=3.0)
    logits, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    terms = Objective(bits_weight=2.0)(model, logits, labels, None)
    assert math.isclose(float(terms["bits"].detach()), 2.0 * (4.0 - 3.0), rel_tol=1e-6)
    assert math.isclose(
        float(terms["loss"].detach()), float((terms["task"] + terms["bits"]).detach()), rel_tol=1e-6
    )
    fix_bit_widths(model, 3.0)
    assert "bits" not in Objective()(model, logits, labels, None)
    assert float(bit_penalty(model, 3.0).detach()) == 0.0  # nothing left to learn


def test_fix_bit_widths_lowers_the_layer_rounded_up_the_most_first():
    """Learned 4.4 / 3.6 / 5.5 round to 4 / 4 / 6, mean 4.154 > 4.0. The most rounded-up layer ("4",
    +0.5) drops to 5 (mean 4.077), then "2" (+0.4, now the most) to 3 (mean 3.462). Largest-layer-first
    would have given 4 / 3 / 6."""
    model = _prepared()
    _set_bits(model, {"0": 4.4, "2": 3.6, "4": 5.5})
    bits = fix_bit_widths(model, 4.0)
    assert bits == {"0": 4, "2": 3, "4": 5} and all(type(b) is int for b in bits.values())
    assert sum(bits[f] * n for f, n in COUNTS.items()) / TOTAL <= 4.0
    assert math.isclose(mean_bits(model), 5760 / TOTAL, rel_tol=1e-12)
    for fqn, b in bits.items():
        fq = model.get_submodule(fqn).weight_fq
        assert fq.spec.format == f"int{b}" and fq.mode == "lsq" and int(fq.fixed_bits) == b
    assert learned_bits(model) == {} and fix_bit_widths(model, 4.0) == {}


def test_fix_bit_widths_within_the_budget_only_rounds():
    model = _prepared()
    _set_bits(model, {"0": 4.4, "2": 3.6, "4": 1.2})  # 1.2 is clamped to 2
    assert fix_bit_widths(model, 6.0) == {"0": 4, "2": 4, "4": 2}


def test_fix_bit_widths_counts_layers_fixed_before():
    """A layer fixed at 8 bits keeps its 8: a budget of 2 cannot be met; the error names the mean."""
    model = _prepared()
    model[0].weight_fq.fix_bits(8)
    _set_bits(model, {"2": 2.0, "4": 2.0})
    with pytest.raises(LowbitError, match=r"a mean of 2.0 weight bits is below the 2-bit floor \(3.85\)"):
        fix_bit_widths(model, 2.0)
    assert fix_bit_widths(model, 4.0) == {"2": 2, "4": 2}  # (8 * 512 + 2 * 1152) / 1664 = 3.85


def test_a_nan_bit_width_is_named():
    model = _prepared()
    _set_bits(model, {"2": float("nan")})
    with pytest.raises(LowbitError, match="2.weight: learned bit width is nan"):
        fix_bit_widths(model, 4.0)
    assert len(learned_bits(model)) == 3  # nothing fixed


# ---------------------------------------------------------------- training, resume, convert


def test_training_learns_then_fixes_the_widths_within_the_budget():
    """Budget 3 from int4: every width steps down; bit widths step at BITS_LR_SCALE times the learning
    rate (Adam's first step is exactly the group's lr); at ``freeze_bits_after`` they become integers."""
    model = _prepared(budget=3.0, freeze_bits_after=10)
    x, y = _task()
    data = shuffled(x, y, batch_size=32)
    one = copy.deepcopy(model)
    train(one, data, TrainOptions(steps=1, lr=1e-3, warmup=0.0))
    for fq, _ in learned_bits(one).values():
        torch.testing.assert_close(
            fq.bit_width.detach(), torch.tensor(4.0 - BITS_LR_SCALE * 1e-3), rtol=0, atol=1e-6
        )
    result = train(model, data, TrainOptions(steps=20, lr=1e-2, log_every=5))
    fixed = [h for h in result.history if "bit_widths" in h]
    assert len(fixed) == 1 and fixed[0]["step"] == 10
    widths = fixed[0]["bit_widths"]
    assert set(widths) == set(COUNTS) and sum(widths[f] * n for f, n in COUNTS.items()) / TOTAL <= 3.0
    assert "bits" in result.history[0] and "bits" not in result.history[-1]
    assert learned_bits(model) == {}
    for fqn, b in widths.items():
        assert model.get_submodule(fqn).weight_fq.spec.format == f"int{b}"


def test_fixed_widths_survive_a_state_dict_load():
    """``fixed_bits`` is a buffer; loading it into a freshly prepared model (all "bits" mode) restores the
    ``int{b}`` spec through the load_state_dict post hook."""
    model = _prepared()
    _set_bits(model, {"0": 6.2, "2": 2.4, "4": 7.7})
    bits = fix_bit_widths(model, 5.0)
    assert bits == {"0": 6, "2": 2, "4": 8}
    fresh = _prepared()
    assert all(m.weight_fq.mode == "bits" for m in qat_modules(fresh).values())
    fresh.load_state_dict(model.state_dict())
    for fqn, b in bits.items():
        fq, want = fresh.get_submodule(fqn).weight_fq, model.get_submodule(fqn).weight_fq
        assert (
            fq.spec.format == f"int{b}" and fq.mode == "lsq" and (fq.qmin, fq.qmax) == (want.qmin, want.qmax)
        )
        assert not fq.bit_width.requires_grad and torch.equal(fq.log_scale, want.log_scale)
    x = _task()[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    unfixed = _prepared()
    unfixed.load_state_dict(_prepared().state_dict())
    assert all(m.weight_fq.mode == "bits" for m in qat_modules(unfixed).values())


def test_resume_after_the_widths_were_fixed_is_bit_identical(tmp_path):
    """Widths fixed at step 2, checkpoint at 3, crash at 4: the restart (from a fresh copy, widths still
    learned) trains on as int{b}, like an uninterrupted run."""
    start = _prepared(budget=3.5, freeze_bits_after=2)
    x, y = _task()
    data = shuffled(x, y, batch_size=32, seed=1)
    opts = TrainOptions(steps=6, every=3, lr=1e-2, log_every=1)
    whole = copy.deepcopy(start)
    reference = train(whole, data, opts, checkpoint=tmp_path / "a")
    crashed = copy.deepcopy(start)
    with pytest.raises(RuntimeError, match="power cut"):
        train(crashed, Crashing(data, at=4), opts, checkpoint=tmp_path / "b")
    restarted = copy.deepcopy(start)
    result = train(restarted, data, opts, checkpoint=tmp_path / "b")
    assert result.resumed_from == 3 and result.history == reference.history
    assert [h["step"] for h in result.history if "bit_widths" in h] == [2]
    want, got = whole.state_dict(), restarted.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    for fqn in COUNTS:
        assert restarted.get_submodule(fqn).weight_fq.spec == whole.get_submodule(fqn).weight_fq.spec


class SmallCNN(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),  # 216 weights
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 72
            nn.ReLU(),
            nn.Conv2d(8, 16, 1),  # 128
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),  # 160
        )
        self.eval()


def test_convert_fixes_unfixed_widths_and_deploys_per_layer_formats(tmp_path):
    """Learned 7.4 / 2.2 / 3.6 / 5.0 round to 7 / 2 / 4 / 5 (mean 5.25 > 4); convert lowers them greedily
    to 6 / 2 / 2 / 3 (mean 4.0) and deploys each layer in its own format; outputs equal the fake-quantized
    model with those widths."""
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(2)]
    net = SmallCNN()
    prepare(net, QATConfig(weights="int4", activation_bits=8, bit_budget=4.0), calib=calib)
    widths = {"0.0": 7.4, "1": 2.2, "3": 3.6, "7": 5.0}
    _set_bits(net, widths)
    reference = copy.deepcopy(net)
    assert fix_bit_widths(reference, 4.0) == {"0.0": 6, "1": 2, "3": 2, "7": 3}
    x = torch.randn(4, 3, 10, 10, generator=g)
    with torch.no_grad():
        fake = reference(x)
    summary = convert(net)
    formats = {f: net.get_submodule(f).spec.format for f in widths}
    assert formats == {"0.0": "int6", "1": "int2", "3": "int2", "7": "int3"}
    assert all(fmt in summary.quantized[f] for f, fmt in formats.items())
    assert type(net[0][0]) is QStaticConv2d and type(net[7]) is QStaticLinear
    with torch.no_grad():
        out = net(x)
    assert (out - fake).abs().max() < 1e-6  # same codes; float32 summation order only
    lowbit.save(net, tmp_path / "mixed")
    back = lowbit.load(tmp_path / "mixed", model=SmallCNN())
    assert {f: back.get_submodule(f).spec.format for f in widths} == formats
    with torch.no_grad():
        assert torch.equal(back(x), out)


# ---------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bit_budget": 1.5}, r"bit_budget must be a mean of 2..8 bits, got 1.5"),
        ({"bit_budget": 8.5}, r"bit_budget must be a mean of 2..8 bits, got 8.5"),
        ({"bit_budget": 4.0, "weights": "ternary"}, r"learned bit widths need int<b> weights and weight_le"),
        ({"bit_budget": 4.0, "weights": "binary"}, r"learned bit widths need int<b> weights"),
        ({"bit_budget": 4.0, "weight_learning": "fixed"}, r"and weight_learning='lsq'"),
        ({"bit_budget": 4.0, "freeze_bits_after": -1}, r"freeze_bits_after must be >= 0 or None, got -1"),
    ],
    ids=["below-2", "above-8", "ternary", "binary", "fixed-weights", "freeze-negative"],
)
def test_bad_bit_budget_config_is_named(kwargs, match):
    with pytest.raises(LowbitError, match=match):
        QATConfig(**kwargs)


def test_budget_edges_are_accepted():
    assert QATConfig(bit_budget=2.0).bit_budget == 2.0 and QATConfig(bit_budget=8.0).bit_budget == 8.0
    assert QATConfig(weights="int8", bit_budget=3.0, freeze_bits_after=0).freeze_bits_after == 0
