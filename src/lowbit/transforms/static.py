"""Handler for ``StaticW8A8``: fold BatchNorm, calibrate activation ranges, swap in static W8A8 layers.

Steps: BatchNorm2d folded into the preceding conv (``fold_batchnorm_``); with ``equalize``, cross-layer
equalization of consecutive layer pairs (``equalize_``; a ReLU6 between a pair becomes a ReLU only where
it is fused, see below, so the saved model's fused activations are ``nn.Identity``); with
``stretch_relu6``, quiet channels of ReLU6 outputs read by depthwise convs scaled up from their
calibration peaks (``stretch_relu6_``, one extra pass over ``calib``); observers attached to the
input and output of every selected ``nn.Linear``/``nn.Conv2d`` while ``calib`` runs through the float
model; weights quantized per output channel; each layer replaced by ``QStaticLinear``/``QStaticConv2d``
holding its calibrated qparams. Everything else stays float and is listed in the summary (layers
the calibration never reached are kept float too, with that reason; ``quantize_`` lists the rest, see
``lowbit.transforms.quantize``).

Activation fusion (uint8 activations): a layer directly followed by ReLU/ReLU6 (``fusable_activations``)
has its output observed after the activation. Its output range then starts at 0 (zero point 0) and ends
at most at 6, so the codes themselves apply the activation, which becomes ``nn.Identity``: the layer's
output quantization no longer wastes half its codes on negatives, and the next layer's input (the same
tensor, seen by the same kind of observer) gets the same qparams, as ONNX Runtime's fused graphs want.

Residual adds written as ``lowbit.nn.Add`` modules (the bundled MobileNetV2 does) have their output
observed too and become ``QStaticAdd`` (unless ``int8_outputs="none"``): the skip path then carries
the same codes the next layer reads, and ONNX Runtime runs ``QLinearAdd`` instead of a float Add between
dequantize and quantize nodes (MobileNetV2: 9 float Adds and 27 Q/DQ nodes fewer).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.bias_correction import ChannelMean, bias_shift
from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import quantize
from lowbit.core.spec import PerChannel, QuantSpec
from lowbit.nn.static import ACTIVATION_SPECS, STATIC_FLOAT_TO_Q, WEIGHT_SPEC, Add, QStaticAdd
from lowbit.observers import make_observer
from lowbit.transforms.calibrate import observing, run_batches
from lowbit.transforms.configs import StaticW8A8
from lowbit.transforms.equalize import equalize_, stretch_relu6_
from lowbit.transforms.fold import fold_batchnorm_, fusable_activations
from lowbit.transforms.quantize import QuantSummary, Selector, register_handler, require_quantized
from lowbit.transforms.reconstruct import Reconstruction, reconstruct_
from lowbit.transforms.rollback import rollback_on_error


def _observer(config: StaticW8A8, spec, fqn: str):
    opts = {"percentile": config.percentile} if config.observer == "percentile" else {}
    return make_observer(config.observer, spec, name=fqn, **opts)


def weight_spec(bits: int) -> QuantSpec:
    """Symmetric per-output-channel ``int{bits}`` weights (``WEIGHT_SPEC`` for 8)."""
    return WEIGHT_SPEC if bits == 8 else QuantSpec(f"int{bits}", True, PerChannel(0), "float32")


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor, method: str, name: str, spec: QuantSpec = WEIGHT_SPEC
) -> QuantizedTensor:
    """Symmetric per-output-channel codes (int8 unless ``spec`` says otherwise) of ``weight (out, ...)``
    held as ``(out, prod(...))`` rows."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    obs = make_observer(method, spec, name=name)
    obs.update(w)
    scale, zp = obs.qparams()
    scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    return QuantizedTensor(quantize(w, scale, zp, spec, name), scale, zp, spec)


@register_handler(StaticW8A8)
def static_w8a8(
    model: nn.Module, config: StaticW8A8, calib, select: Selector, progress: bool
) -> QuantSummary:
    """Quantize ``model`` in place: see the module docstring. On an error (a bad calibration batch, a
    NaN activation, no layer selected) the model is left as it came, BatchNorm folding and rescaling
    undone."""
    with rollback_on_error(model):
        summary = _static_w8a8(model, config, calib, select, progress)
        require_quantized(summary)  # here, so that the folding is undone too
    return summary


def _static_w8a8(model: nn.Module, config: StaticW8A8, calib, select: Selector, progress: bool):
    summary = QuantSummary(config)
    learned = config.rounding != "nearest"
    if calib is not None and not isinstance(calib, (list, tuple)) and (config.stretch_relu6 or learned):
        calib = list(calib)  # read more than once: channel peaks, observers, reconstruction
    if config.fold_bn:
        summary.folded = {bn: conv for conv, bn in fold_batchnorm_(model)}
    act_spec = ACTIVATION_SPECS[config.activation_format]
    targets = {f: m for f, m in model.named_modules() if type(m) in STATIC_FLOAT_TO_Q and select(f)}
    _check_layer_bits(config, targets)
    int8_out = {f for f, m in targets.items() if _int8_output(config, m)}
    fuse = config.fuse_activations and not act_spec.symmetric
    fused = fusable_activations(model, int8_out) if fuse else {}
    if config.equalize:
        pairs = equalize_(model, replace_relu6=set(fused.values()))
        summary.equalized = [(p.first, p.second) for p in pairs]
    if config.stretch_relu6:
        pairs = stretch_relu6_(model, calib, select, progress=progress)
        summary.stretched = [(p.first, p.second) for p in pairs]
    teacher = copy.deepcopy(model).eval() if learned else None  # the float model as rewritten above
    ins = {f: _observer(config, act_spec, f) for f in targets}
    outs = {f: _observer(config, act_spec, f) for f in int8_out}
    means = {f: ChannelMean() for f in targets} if config.bias_correction else {}
    watch = {f: _Both(obs, means[f]) if means else obs for f, obs in ins.items()}
    adds = _add_observers(model, config, act_spec, select)
    with observing(model, watch, {fused.get(f, f): obs for f, obs in outs.items()} | adds):
        _, spec = run_batches(model, calib, progress)
    weights = _swap_layers(model, config, targets, (ins, outs, means), fused, summary, progress)
    _swap_adds(model, adds, act_spec, summary)
    if learned:
        opts = Reconstruction(
            _GRANULARITY[config.rounding],
            config.recon_steps,
            drop=config.recon_drop if config.rounding == "brecq" else 0.0,
            device=config.recon_device,
        )
        layer_fused = {a: f for a, f in summary.fused.items() if f in weights}
        flips = reconstruct_(model, teacher, weights, layer_fused, calib, opts, progress)
        summary.rounded = {
            f: f"{config.rounding}, {100 * v:.1f}% rounded away from nearest" for f, v in flips.items()
        }
    gone = set(summary.folded) | set(summary.fused)  # modules now nn.Identity: saved, so load can match
    model.lowbit_identity = sorted(set(getattr(model, "lowbit_identity", ())) | gone)
    model.lowbit_inputs = spec  # shapes/dtypes of a calibration batch: an export example
    return summary


_GRANULARITY = {"adaround": "layer", "brecq": "block"}


def _check_layer_bits(config: StaticW8A8, targets: dict) -> None:
    """``LowbitError`` naming the ``config.layer_bits`` entries that are not a selected layer this handler
    quantizes (the model is rolled back by the caller)."""
    bad = [f for f in config.layer_bits if f not in targets]
    if bad:
        kinds = ", ".join(t.__name__ for t in STATIC_FLOAT_TO_Q)
        raise LowbitError(
            f"StaticW8A8.layer_bits names {len(bad)} layer(s) that are not selected {kinds} layers of this "
            f"model: {', '.join(repr(f) for f in bad[:5])}{' ...' if len(bad) > 5 else ''}"
        )


def _swap_layers(model, config: StaticW8A8, targets: dict, observers, fused: dict, summary, progress) -> dict:
    """Replace each calibrated target by its static layer; returns fqn -> (float weight, weight scales)
    of the swapped layers (what learned rounding starts from)."""
    ins, outs, means = observers
    act_spec = ACTIVATION_SPECS[config.activation_format]
    weights = {}
    for fqn, m in tqdm(targets.items(), desc="quantize", unit="layer", disable=not progress):
        w_spec = weight_spec(config.layer_bits.get(fqn, config.weight_bits))
        in_obs, out_obs = ins[fqn], outs.get(fqn)
        if in_obs.batches == 0:
            summary.skipped[fqn] = "no calibration batch reached it"
            continue
        try:
            q = STATIC_FLOAT_TO_Q[type(m)].from_float(m, w_spec, act_spec)
        except LowbitError as e:
            summary.skipped[fqn] = str(e)
            continue
        qt = quantize_weight(m.weight, config.weight_observer, f"{fqn}.weight", w_spec)
        q.set_weight(qt)
        weights[fqn] = (m.weight.detach().float(), qt.scale)
        if m.bias is not None:
            q.bias = m.bias.detach().clone()
        if means:
            _correct_bias(q, m, qt, means[fqn])
        q.set_activation_qparams("input", *in_obs.qparams())
        q.requantize_output = out_obs is not None
        if out_obs is not None:
            q.set_activation_qparams("output", *out_obs.qparams())
        model.set_submodule(fqn, q)
        summary.quantized[fqn] = q.extra_repr()
        if fqn in fused:
            model.set_submodule(fused[fqn], nn.Identity())
            summary.fused[fused[fqn]] = fqn
    return weights


class _Both:
    """Feeds one hooked activation to an observer and a ``ChannelMean``."""

    def __init__(self, obs, mean: ChannelMean) -> None:
        self.obs, self.mean = obs, mean

    def update(self, x: torch.Tensor) -> None:
        self.obs.update(x)
        self.mean.update(x)


def _correct_bias(q: nn.Module, m: nn.Module, qt: QuantizedTensor, mean: ChannelMean) -> None:
    """``q.bias -= (W_q - W) E[x]``; a layer without bias gets one."""
    err = qt.dequantize().reshape(m.weight.shape) - m.weight.detach().float()
    shift = bias_shift(err, mean.mean(), getattr(m, "groups", 1))
    bias = q.bias if q.bias is not None else torch.zeros_like(shift)
    q.bias = (bias.float() - shift).to(m.weight.dtype)


def _add_observers(model: nn.Module, config: StaticW8A8, act_spec, select: Selector) -> dict:
    """fqn -> output observer of each selected residual ``Add`` (none when no layer outputs int8)."""
    if config.int8_outputs == "none":
        return {}
    return {
        f: _observer(config, act_spec, f)
        for f, m in model.named_modules()
        if isinstance(m, Add) and select(f)
    }


def _swap_adds(model: nn.Module, observers: dict, act_spec, summary: QuantSummary) -> None:
    """Replace each calibrated ``Add`` by a ``QStaticAdd`` with its observed output qparams."""
    for fqn, obs in observers.items():
        if obs.batches == 0:
            summary.skipped[fqn] = "no calibration batch reached it"
            continue
        q = QStaticAdd(act_spec)
        q.set_activation_qparams("output", *obs.qparams())
        model.set_submodule(fqn, q)
        summary.quantized[fqn] = q.extra_repr()


def _int8_output(config: StaticW8A8, m: nn.Module) -> bool:
    return config.int8_outputs == "all" or (config.int8_outputs == "conv" and isinstance(m, nn.Conv2d))
