"""``prepare``: swap a float model's Linear/Conv2d layers for training twins; ``convert``: swap the trained
twins for the deployed quantized layers.

prepare (in place): every selected ``nn.Linear`` and ``nn.Conv2d`` (zero padding; depthwise and grouped
included) becomes a ``QATLinear`` / ``QATConv2d``; with ``fold_bn``, a Conv2d followed by a BatchNorm2d in
one ``nn.Sequential`` becomes a ``QATConvBn2d`` and the BatchNorm's place an ``nn.Identity``. Weight
scales start from the weights (``weight_observer`` per output channel or group; binary: mean ``|w|``);
activation ranges from ``config.observer`` over the calibration batches, so step 0 is the post-training
quantized model. ``pact`` needs inputs that are never negative: a layer whose calibration inputs went
below 0 (a network's first layer, reading normalised pixels) learns with ``lsq+`` instead, noted in the
summary.

convert (in place): each twin becomes ``QStaticLinear`` / ``QStaticConv2d`` (integer-only: codes of the
learned weight scales, input qparams from the learned activation quantizer, float output
``requantize_output=False``) or, without activation quantization, ``QLinear``; ``QATConvBn2d`` deploys
the folded weight and bias. The converted model saves, loads and exports like a post-training one;
its outputs equal the fake-quantized model's in eval mode up to float32 summation order.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import choose_qparams, quantize
from lowbit.core.spec import PerChannel, QuantSpec
from lowbit.nn.modules import QLinear, QuantizedModule
from lowbit.nn.static import QStaticConv2d, QStaticLinear
from lowbit.observers import make_observer
from lowbit.qat.bits import fix_bit_widths
from lowbit.qat.config import QATConfig
from lowbit.qat.fake import FakeQuantizer, weight_rows
from lowbit.qat.modules import QAT_MODULES, QATConv2d, QATConvBn2d, QATLinear, QATModule, qat_modules
from lowbit.transforms.calibrate import run_batches
from lowbit.transforms.configs import config_from_dict
from lowbit.transforms.fold import conv_bn_pairs
from lowbit.transforms.quantize import QuantSummary, Selector, note_float_layers, require_quantized
from lowbit.transforms.rollback import rollback_on_error


def row_spec(fmt: str) -> QuantSpec:
    """Symmetric float32-scale spec of ``fmt`` with one scale per row of ``weight_rows`` (the form the
    weight quantizers and ``convert`` work in)."""
    return QuantSpec(fmt, True, PerChannel(0), "float32")


def fake_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """fqn -> every ``FakeQuantizer`` in ``model``."""
    return {f: m for f, m in model.named_modules() if isinstance(m, FakeQuantizer)}


def _check_float(model: nn.Module) -> None:
    for fqn, m in model.named_modules():
        if isinstance(m, QAT_MODULES):
            raise LowbitError(f"model is already prepared for QAT ({fqn} is a {type(m).__name__})")
        if isinstance(m, QuantizedModule):
            raise LowbitError(
                f"model is already quantized ({fqn} is a {type(m).__name__}); prepare the float model"
            )


@torch.no_grad()
def _weight_qparams(weight: torch.Tensor, config: QATConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(scale (rows, 1), zero point)`` of ``weight`` as the rows ``weight_rows`` gives."""
    rows = weight_rows(weight.detach().float(), config.group_size)
    spec = row_spec(config.weights)
    if spec.fmt.kind != "int" or config.weight_observer == "minmax":
        scale, zp = choose_qparams(rows, spec, name)
    else:
        obs = make_observer(config.weight_observer, spec, name=name)
        obs.update(rows)
        scale, zp = obs.qparams()
    return scale.reshape(-1, 1), zp


def _twin(fqn: str, m: nn.Module, bn: nn.BatchNorm2d | None, config: QATConfig) -> QATModule:
    """The training twin of layer ``m`` (and the BatchNorm after it), weight quantizer initialised."""
    act = config.activation_spec()
    input_fq = FakeQuantizer(act, config.activation_learning, (), f"{fqn} input") if act else None
    rows = weight_rows(m.weight, config.group_size).shape[0]
    mode = "bits" if config.bit_budget is not None else config.weight_learning
    weight_fq = FakeQuantizer(row_spec(config.weights), mode, (rows, 1), f"{fqn}.weight")
    if isinstance(m, nn.Linear):
        twin = QATLinear(m, weight_fq, input_fq, config.group_size)
    elif bn is not None:
        twin = QATConvBn2d(m, bn, weight_fq, input_fq)
    else:
        twin = QATConv2d(m, weight_fq, input_fq)
    with torch.no_grad():
        weight_fq.set_qparams(*_weight_qparams(twin.deploy_weight()[0], config, f"{fqn}.weight"))
    return twin


def _targets(model: nn.Module, config: QATConfig, select: Selector, summary: QuantSummary) -> dict:
    """fqn -> (layer, BatchNorm after it or None) of every layer ``prepare`` swaps."""
    bns = dict(conv_bn_pairs(model)) if config.fold_bn else {}
    out = {}
    for fqn, m in model.named_modules():
        if type(m) not in (nn.Linear, nn.Conv2d) or not select(fqn):
            continue
        if isinstance(m, nn.Conv2d) and config.activation_bits is None:
            summary.skipped[fqn] = "weight-only QAT deploys Linear layers only (QLinear); convs stay float"
        elif isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            summary.skipped[fqn] = (
                f"Conv2d padding {m.padding!r}/{m.padding_mode!r}: explicit zero padding only"
            )
        elif config.group_size and m.weight[0].numel() % config.group_size:
            summary.skipped[fqn] = (
                f"{m.weight[0].numel()} inputs not a multiple of group_size {config.group_size}"
            )
        else:
            out[fqn] = (m, model.get_submodule(bns[fqn]) if fqn in bns else None, bns.get(fqn))
    return out


def prepare(
    model: nn.Module,
    config: QATConfig,
    calib=None,
    *,
    include=(),
    exclude=(),
    progress: bool = False,
) -> QuantSummary:
    """Make ``model`` (float, in place) trainable with quantization in the loop; see the module
    docstring. ``calib``: batches that set the initial activation ranges (needed unless
    ``config.activation_bits`` is None). On an error the model is left as it came."""
    if not isinstance(config, QATConfig):
        raise LowbitError(f"lowbit.qat.prepare takes a QATConfig, got {type(config).__name__}")
    _check_float(model)
    with rollback_on_error(model):
        summary = QuantSummary(config)
        select = Selector(include, exclude)
        targets = _targets(model, config, select, summary)
        for fqn, (m, bn, bn_fqn) in targets.items():
            model.set_submodule(fqn, _twin(fqn, m, bn, config))
            if bn_fqn is not None:
                model.set_submodule(bn_fqn, nn.Identity())
                summary.folded[bn_fqn] = fqn
            summary.quantized[fqn] = repr(model.get_submodule(fqn).weight_fq)
        require_quantized(summary)
        if config.activation_bits is not None:
            summary.pact_fallback = _init_activations(model, config, calib, progress)
        note_float_layers(model, summary, select)
    model.lowbit_qat = config.to_dict()
    model.lowbit_identity = sorted(set(getattr(model, "lowbit_identity", ())) | set(summary.folded))
    return summary


def _init_activations(model: nn.Module, config: QATConfig, calib, progress: bool) -> dict[str, str]:
    """Observe each input quantizer over ``calib`` and set its qparams; returns layers where ``pact``
    fell back to ``lsq+`` (negative inputs), with the reason."""
    act = config.activation_spec()
    opts = {"percentile": config.percentile} if config.observer == "percentile" else {}
    fqs = {f: m.input_fq for f, m in qat_modules(model).items()}
    fallback = {}
    for f, fq in fqs.items():
        fq.observer = make_observer(config.observer, act, name=f"{f} input", **opts)
    try:
        _, spec = run_batches(model, calib, progress)
    finally:
        observers = {f: fq.observer for f, fq in fqs.items()}
        for fq in fqs.values():
            fq.observer = None
    for f, fq in fqs.items():
        obs = observers[f]
        if obs.batches == 0:
            raise LowbitError(f"{f}: no calibration batch reached this layer; its input range is unknown")
        lo, hi = obs.range()
        if fq.mode == "pact" and float(lo) < 0:
            fallback[f] = f"inputs reach {float(lo):.3g} < 0: lsq+ instead of pact"
            _fallback_to_lsq_plus(model, f, fq)
            fq = model.get_submodule(f).input_fq
        if fq.mode == "pact":
            scale, zp = _pact_qparams(hi, act)
        else:
            scale, zp = obs.qparams()
        fq.set_qparams(scale, zp)
    model.lowbit_inputs = spec
    return fallback


def _pact_qparams(hi: torch.Tensor, act: QuantSpec) -> tuple[torch.Tensor, None]:
    return (hi.float().clamp_min(1e-8) / act.fmt.qmax), None


def _fallback_to_lsq_plus(model: nn.Module, fqn: str, fq: FakeQuantizer) -> None:
    twin = model.get_submodule(fqn)
    twin.input_fq = FakeQuantizer(fq.spec, "lsq+", tuple(fq.scale.shape), fq.name)


# ---------------------------------------------------------------- convert


@torch.no_grad()
def _codes(twin: QATModule, spec: QuantSpec, name: str) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """The deployed weight (codes ``(out, cols)`` of the learned scales) and bias of ``twin``."""
    weight, bias = twin.deploy_weight()
    bias = twin.integer_bias(bias)
    scale, _ = twin.weight_fq.qparams()
    rows = weight_rows(weight.detach().float(), twin.group_size)
    zp = torch.zeros(scale.shape, dtype=spec.fmt.torch_dtype) if spec.fmt.kind == "int" else None
    codes = quantize(rows, scale, zp, row_spec(spec.format), name).reshape(weight.shape[0], -1)
    if twin.group_size:
        scale = scale.reshape(weight.shape[0], -1)
        zp = zp.reshape(scale.shape) if zp is not None else None
    bias = bias.detach().float().clone() if bias is not None else None
    return QuantizedTensor(codes, scale, zp, spec), bias


def _deployed(fqn: str, twin: QATModule, config: QATConfig) -> nn.Module:
    spec = replace(config.weight_spec(), format=twin.weight_fq.spec.format)  # learned widths differ
    act = config.activation_spec()
    qt, bias = _codes(twin, spec, f"{fqn}.weight")
    if isinstance(twin, QATLinear):
        has_bias = bias is not None
        if act is None:
            q = QLinear(twin.in_features, twin.out_features, spec, has_bias, twin.weight.dtype)
        else:
            q = QStaticLinear(
                twin.in_features, twin.out_features, spec, has_bias, twin.weight.dtype, act_spec=act
            )
    else:
        q = QStaticConv2d(twin.conv, spec, bias is not None, twin.weight.dtype, act)
    q.set_weight(qt)
    if bias is not None:
        q.bias = bias.to(twin.weight.dtype)
    if act is not None:
        scale, zp = twin.input_fq.qparams()
        zp = zp if zp is not None else torch.zeros((), dtype=act.fmt.torch_dtype)
        q.set_activation_qparams("input", scale, zp)
        q.requantize_output = False
    return q


def convert(model: nn.Module) -> QuantSummary:
    """Replace every training twin in ``model`` (in place) by its deployed layer; see the module docstring."""
    twins = qat_modules(model)
    if not twins or getattr(model, "lowbit_qat", None) is None:
        raise LowbitError("model was never prepared for QAT (call lowbit.qat.prepare first)")
    config = config_from_dict(model.lowbit_qat)
    summary = QuantSummary(config)
    with rollback_on_error(model):
        if config.bit_budget is not None:
            fix_bit_widths(model, config.bit_budget)
        for fqn, twin in twins.items():
            q = _deployed(fqn, twin, config)  # qparams() refuses a NaN, Inf or zero scale
            model.set_submodule(fqn, q)
            summary.quantized[fqn] = q.extra_repr()
    model.lowbit_config = config.to_dict()
    del model.lowbit_qat
    return summary
