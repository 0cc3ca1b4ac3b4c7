"""Per-layer error of a quantized model against its float reference, on real inputs.

For every quantized layer (``QuantizedWeightModule``) the float reference weight is the same-named layer
of the float model, with BatchNorm folded where the quantized model folded it and brought into the
quantized layer's basis (``lowbit.transforms.basis``: the channel rescalings of AWQ, SmoothQuant,
cross-layer equalization and ReLU6 stretching), so both weights mean the same thing:

- weight SQNR ``10 log10(|W|^2 / |W_q - W|^2)`` in dB and relative error ``|W_q - W| / |W|``;
- local output SQNR: the quantized model runs the batches, and each quantized layer's input ``x`` is
  also passed through the reference weight; ``10 log10(sum y^2 / sum (y_q - y)^2)`` over the outputs.
  This is the error the layer itself adds on the inputs it really receives (activation quantization of
  static and dynamic layers included), so a broken layer stands out from those after it;
- end-to-end output SQNR: the float model runs the same batches and each layer's output (in the same
  basis) is compared with the quantized model's; errors of all earlier layers are included.

Outputs are compared on a fixed sample of their rows (positions or pixels): at most ``rows`` per layer
and batch. Where the basis of a rescaled model was not recorded (checkpoints written before lowbit
recorded it), the rescaled layers get no figures rather than wrong ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.eval.size import tensor_bytes
from lowbit.nn.modules import QEmbedding, QuantizedWeightModule
from lowbit.nn.static import QStaticConv2d, StaticActivations
from lowbit.transforms.basis import to_basis
from lowbit.transforms.fold import fold_batchnorm_, fusable_activations

Tensor = torch.Tensor


@dataclass
class LayerError:
    """One quantized layer: ``format`` (e.g. "int4 g128 asym"), stored ``bytes``, ``params`` (weights), SQNRs
    in dB (None where not measurable), ``order`` (call order in the quantized forward, -1: never ran)."""

    name: str
    kind: str
    format: str
    backend: str | None
    params: int
    bytes: int
    weight_sqnr_db: float | None = None
    weight_rel_error: float | None = None
    output_sqnr_db: float | None = None
    end_to_end_sqnr_db: float | None = None
    order: int = -1
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Ref:
    weight: Tensor  # float64, the quantized layer's basis and shape
    bias: Tensor | None
    rows: Tensor | None  # output channel factors of the basis (for the float model's outputs)
    act: nn.Module | None = None  # the float ReLU/ReLU6 fused into the quantized layer
    act_fqn: str | None = None


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``10 log10(signal / noise)`` from sums of squares; inf for zero noise, -inf for zero signal."""
    if noise_sq <= 0:
        return math.inf
    if signal_sq <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


def _format(m: QuantizedWeightModule) -> str:
    return m.format_label() + (" a8" if isinstance(m, StaticActivations) else "")


def _needs_basis(config: dict | None) -> bool:
    c = config or {}
    folds = c.get("type") == "SmoothQuant" or c.get("method") in ("awq", "awq+gptq", "qat")
    return folds or bool(c.get("equalize")) or bool(c.get("stretch_relu6"))


def float_reference(quantized: nn.Module, reference: nn.Module) -> nn.Module:
    """A copy of ``reference`` with BatchNorm folded when ``quantized`` folded it (same function)."""
    ref = copy.deepcopy(reference).eval()
    bns = [n for n, m in ref.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    mods = dict(quantized.named_modules())
    if bns and any(isinstance(mods.get(n), nn.Identity) for n in bns):
        fold_batchnorm_(ref)
    return ref


def reference_weights(quantized: nn.Module, reference: nn.Module) -> tuple[dict[str, _Ref], dict[str, str]]:
    """``({fqn: reference weight in the quantized basis}, {fqn: why none})`` for every quantized layer;
    ``reference`` is ``float_reference``'s output."""
    basis = getattr(quantized, "lowbit_basis", None)
    unknown = basis is None and _needs_basis(getattr(quantized, "lowbit_config", None))
    mods = dict(reference.named_modules())
    gone = set(getattr(quantized, "lowbit_identity", ()))
    qnames = [n for n, m in quantized.named_modules() if isinstance(m, QuantizedWeightModule)]
    fused = {n: a for n, a in fusable_activations(reference, qnames).items() if a in gone}
    refs, why = {}, {}
    for fqn, q in quantized.named_modules():
        if not isinstance(q, QuantizedWeightModule):
            continue
        f = mods.get(fqn)
        if f is None or getattr(f, "weight", None) is None or isinstance(f, QuantizedWeightModule):
            why[fqn] = "no float layer of this name in the reference"
        elif unknown:
            why[fqn] = "rescaled model whose basis was not recorded"
        else:
            entry = (basis or {}).get(fqn)
            w, b = to_basis(f.weight, getattr(f, "bias", None), entry, getattr(f, "groups", 1))
            if w.numel() != q.rows * q.cols:
                why[fqn] = f"float weight {tuple(w.shape)} does not match the quantized layer"
                continue
            rows = (entry or {}).get("rows")
            act = fused.get(fqn)
            refs[fqn] = _Ref(w.reshape(_shape(q)), b, rows, mods[act] if act else None, act)
    return refs, why


def _shape(q: QuantizedWeightModule) -> tuple[int, ...]:
    return tuple(q.weight_shape) if isinstance(q, QStaticConv2d) else (q.rows, q.cols)


def weight_error(q: QuantizedWeightModule, ref: _Ref) -> tuple[float, float]:
    """(SQNR dB, relative error) of ``q``'s dequantized weight against ``ref.weight``."""
    wq = q.dequantized_weight(torch.float32).double().reshape(ref.weight.shape)
    signal, noise = float(ref.weight.pow(2).sum()), float((wq - ref.weight).pow(2).sum())
    return sqnr_db(signal, noise), math.sqrt(noise / signal) if signal > 0 else math.inf


def _apply(q: nn.Module, ref: _Ref, x: Tensor) -> Tensor:
    """The reference layer's output for ``q``'s input ``x`` (float64)."""
    if isinstance(q, QEmbedding):
        return F.embedding(x, ref.weight)
    x = x.double()
    if isinstance(q, QStaticConv2d):
        c = q.conv
        y = F.conv2d(x, ref.weight, ref.bias, c["stride"], c["padding"], c["dilation"], c["groups"])
    else:
        y = F.linear(x, ref.weight, ref.bias)
    if ref.act is None:
        return y
    if type(ref.act) is nn.ReLU6:  # clamp at 6 in the float basis: 6 * rows in this one
        top = 6.0 * (ref.rows if ref.rows is not None else torch.ones(y.shape[1], dtype=y.dtype))
        return torch.minimum(y.clamp_min(0), top.reshape(-1, *([1] * (y.dim() - 2))))
    return y.clamp_min(0)


def _rows(y: Tensor, channel_first: bool, keep: int) -> Tensor:
    """``y`` as (rows, channels), at most ``keep`` rows evenly spread (the same rows for equal shapes)."""
    y = y.detach()
    y = y.movedim(1, -1) if channel_first else y
    y = y.reshape(-1, y.shape[-1])
    if len(y) > keep:
        y = y[torch.linspace(0, len(y) - 1, keep).long()]
    return y.double()


class _Sums:
    def __init__(self) -> None:
        self.local = [0.0, 0.0]  # signal, noise
        self.e2e = [0.0, 0.0]


def _run(model: nn.Module, batches: list, forward: Callable, hooks: dict[str, Callable]) -> None:
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(h) for n, h in hooks.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()


def output_errors(
    quantized: nn.Module,
    reference: nn.Module,
    refs: dict[str, _Ref],
    batches: Iterable,
    forward: Callable | None = None,
    rows: int = 256,
) -> tuple[dict[str, tuple[float, float | None]], list[str]]:
    """``({fqn: (local SQNR dB, end-to-end SQNR dB)}, call order)`` over ``batches`` (module docstring);
    ``forward(model, batch)`` runs one batch (default ``model(batch)``)."""
    forward = forward or (lambda m, b: m(b))
    batches = list(batches)
    mods = dict(quantized.named_modules())
    floats: dict[str, list[Tensor]] = {n: [] for n in refs}

    def keep(n):
        def hook(mod, args, out):
            floats[n].append(_rows(out, _channel_first(mods[n]), rows))

        return hook

    _run(reference, batches, forward, {refs[n].act_fqn or n: keep(n) for n in refs})
    sums, order = {n: _Sums() for n in refs}, []

    def compare(n):
        def hook(mod, args, out):
            if n not in order:
                order.append(n)
            cf, s = _channel_first(mod), sums[n]
            yq, yl = _rows(out, cf, rows), _rows(_apply(mod, refs[n], args[0]), cf, rows)
            s.local[0] += float(yl.pow(2).sum())
            s.local[1] += float((yq - yl).pow(2).sum())
            if floats[n]:
                yf = floats[n].pop(0)
                yf = yf * refs[n].rows if refs[n].rows is not None else yf
                s.e2e[0] += float(yf.pow(2).sum())
                s.e2e[1] += float((yq - yf).pow(2).sum()) if yf.shape == yq.shape else math.nan

        return hook

    _run(quantized, batches, forward, {n: compare(n) for n in refs})
    out = {}
    for n in order:
        s = sums[n]
        e2e = None if s.e2e[0] == 0 or math.isnan(s.e2e[1]) else sqnr_db(*s.e2e)
        out[n] = (sqnr_db(*s.local), e2e)
    return out, order


def _channel_first(m: nn.Module) -> bool:
    return isinstance(m, (QStaticConv2d, nn.Conv2d))


def layer_errors(
    quantized: nn.Module,
    reference: nn.Module | None,
    batches: Iterable | None = None,
    forward: Callable | None = None,
    rows: int = 256,
) -> list[LayerError]:
    """Every quantized layer of ``quantized`` with its format, bytes and (given the float ``reference``)
    weight errors, and (given ``batches``) output SQNRs; in call order, layers that never ran last."""
    layers = [
        LayerError(
            n,
            type(m).__name__,
            _format(m),
            getattr(m, "backend", None),
            m.rows * m.cols,
            tensor_bytes(m.state_dict()),
        )  # fmt: skip
        for n, m in quantized.named_modules()
        if isinstance(m, QuantizedWeightModule)
    ]
    if not layers:
        raise LowbitError("the model has no quantized layer to report on")
    if reference is None:
        return layers
    ref_model = float_reference(quantized, reference)
    refs, why = reference_weights(quantized, ref_model)
    mods = dict(quantized.named_modules())
    for e in layers:
        if e.name in refs:
            e.weight_sqnr_db, e.weight_rel_error = weight_error(mods[e.name], refs[e.name])
        e.note = why.get(e.name)
    if batches is not None:
        outs, order = output_errors(quantized, ref_model, refs, batches, forward, rows)
        for e in layers:
            if e.name in outs:
                e.output_sqnr_db, e.end_to_end_sqnr_db = outs[e.name]
                e.order = order.index(e.name)
    return sorted(layers, key=lambda e: (e.order < 0, e.order))


def first_below(layers: list[LayerError], threshold_db: float) -> LayerError | None:
    """The first layer in call order whose local output SQNR (else weight SQNR) is below the threshold."""
    for e in layers:
        v = e.output_sqnr_db if e.output_sqnr_db is not None else e.weight_sqnr_db
        if v is not None and v < threshold_db:
            return e
    return None


def worst(layers: list[LayerError], n: int = 10) -> list[LayerError]:
    """The ``n`` layers with the lowest local output SQNR (else weight SQNR); unmeasured ones left out."""

    def key(e):
        return e.output_sqnr_db if e.output_sqnr_db is not None else e.weight_sqnr_db

    return sorted((e for e in layers if key(e) is not None), key=key)[:n]
