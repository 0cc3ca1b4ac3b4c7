"""Learned weight rounding for a statically quantized model: AdaRound layer by layer, BRECQ block by
block, with QDrop's dropped activation quantization.

After ``StaticW8A8`` has calibrated every activation range and swapped in ``QStaticConv2d`` /
``QStaticLinear`` / ``QStaticAdd``, ``reconstruct_`` replaces each of them with a differentiable
stand-in computing what the integer layer computes (input fake-quantized with the layer's input
qparams, the weight with learned up/down rounding under its per-channel scales
(``lowbit.algorithms.adaround``), the bias on its int32 grid, the output fake-quantized where the
layer requantizes) and trains the roundings unit by unit, in forward order:

- a unit is one layer (``granularity="layer"``: AdaRound) or the outermost module holding at most
  ``MAX_BLOCK_LAYERS`` layers (``"block"``: BRECQ; a MobileNetV2 inverted residual, a stem conv with
  its BatchNorm and ReLU6);
- its target is the float model's output of the same unit on the float model's own inputs (for a
  single layer whose ReLU/ReLU6 was fused into its output range: the activation's output);
- its input is what the quantized model, with the units before it already rounded, feeds it; with
  ``drop`` > 0 (QDrop, Wei et al. 2022) each element of the unit's input is the float model's value
  with that probability, and each fake quantization inside the unit is skipped per element with it;
- the loss is the squared error summed over channels and averaged over the rest, plus AdaRound's
  annealed rounding penalty; Adam on the rounding logits.

Then the learned codes go into the static layers (the same scales), which are put back: the model
deploys exactly as after ``StaticW8A8`` with round-to-nearest, integer-only and exportable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.adaround import LAMBDA, LearnedRounding, beta_at
from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.nn.static import QStaticAdd, QStaticConv2d
from lowbit.transforms.calibrate import _call

MAX_BLOCK_LAYERS = 4
GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class Reconstruction:
    """How ``reconstruct_`` trains: unit ``granularity``, Adam ``steps`` of ``batch`` samples at ``lr``,
    QDrop probability ``drop``, random ``seed`` (minibatches and drops), ``device`` of the training
    (None: the model's; the captures run the model where it is, one unit at a time moves)."""

    granularity: str = "block"
    steps: int = 500
    batch: int = 32
    lr: float = 3e-2
    drop: float = 0.5
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise LowbitError(f"reconstruction needs steps >= 1, batch >= 1, lr > 0 ({self})")
        if not 0.0 <= self.drop < 1.0:
            raise LowbitError(f"drop must be in [0, 1), got {self.drop}")


class _Dropper(nn.Module):
    """Fake quantization of activations with the static layer's per-tensor qparams, skipped per element
    with probability ``drop`` while training (QDrop)."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "q", q)  # not a submodule: its buffers stay where the model is
        self.drop, self.gen = 0.0, None

    def fq(self, x: Tensor, side: str) -> Tensor:
        """One fused op (``torch.fake_quantize_per_tensor_affine``: ``x * (1 / s)`` where the kernels
        divide, so a value at a rounding tie may land one code off; training only)."""
        fmt = self.q.act_spec.fmt
        scale = getattr(self.q, f"{side}_scale").float().reshape(1).to(x.device)
        zp = getattr(self.q, f"{side}_zero_point").int().reshape(1).to(x.device)
        y = torch.fake_quantize_per_tensor_affine(x, scale, zp, fmt.qmin, fmt.qmax)
        if self.training and self.drop > 0:
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(
                self.drop, generator=self.gen
            )
            y = torch.where(keep, x, y)
        return y


class _SimLayer(_Dropper):
    """Differentiable stand-in of a ``QStaticConv2d``/``QStaticLinear`` with learned weight rounding."""

    def __init__(self, q: nn.Module, weight: Tensor, scale: Tensor, name: str) -> None:
        super().__init__(q)
        rows = weight.shape[0]
        self.shape = tuple(weight.shape)
        self.rounding = LearnedRounding(weight.reshape(rows, -1), scale, None, q.spec, name)
        bias = None
        if q.bias is not None:  # the int32 grid the integer kernel adds it on
            grid = q.input_scale.double() * scale.double().reshape(-1)
            bias = (torch.round(q.bias.double() / grid) * grid).float()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        xq = self.fq(x, "input")
        w = self.rounding().reshape(self.shape)
        if isinstance(self.q, QStaticConv2d):
            c = self.q.conv
            y = F.conv2d(xq, w, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])
        else:
            y = F.linear(xq, w, self.bias)
        return self.fq(y, "output") if self.q.requantize_output else y


class _SimAdd(_Dropper):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fq(a + b, "output")


def reconstruct_(
    model: nn.Module,
    teacher: nn.Module,
    weights: dict[str, tuple[Tensor, Tensor]],
    fused: dict[str, str],
    calib: list,
    opts: Reconstruction,
    progress: bool = False,
) -> dict[str, float]:
    """Learn the weight rounding of ``model``'s static layers (module docstring) in place.

    teacher: the float model (same module names). weights: static layer fqn -> (float weight as the
    layer had it, e.g. BatchNorm folded, per-channel scales ``(rows, 1)``). fused: activation fqn ->
    the layer whose output range absorbed it. calib: the calibration batches. Returns layer fqn ->
    fraction of its weights rounded away from nearest.
    """
    with torch.inference_mode(False), torch.enable_grad():  # callers may quantize under no_grad
        return _reconstruct(model, teacher, weights, fused, calib, opts, progress)


def _reconstruct(
    model, teacher, weights, fused, calib, opts: Reconstruction, progress: bool
) -> dict[str, float]:
    sims = {f: _SimLayer(model.get_submodule(f), w, s, f"{f}.weight") for f, (w, s) in weights.items()}
    adds = {f: _SimAdd(m) for f, m in model.named_modules() if isinstance(m, QStaticAdd)}
    originals = {f: model.get_submodule(f) for f in (*sims, *adds)}
    home = next(iter(sims.values())).rounding.base.device
    device = torch.device(opts.device) if opts.device else home
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    for sim in (*sims.values(), *adds.values()):
        sim.gen = gen
    for f, sim in (*sims.items(), *adds.items()):
        model.set_submodule(f, sim)
    try:
        model.to(device)  # float modules and stand-ins only now; the static layers stay where they were
        teacher.to(device)
        act_of = {layer: act for act, layer in fused.items()}
        units = _units(model, set(sims), opts.granularity)
        for unit in tqdm(units, desc=f"reconstruct ({opts.granularity})", unit="unit", disable=not progress):
            members = [s for f, s in sims.items() if f == unit or f.startswith(unit + ".")]
            members += [s for f, s in adds.items() if f.startswith(unit + ".")]
            out = act_of.get(unit, unit) if unit in sims else unit
            _fit_unit(model, teacher, unit, out, members, calib, opts, gen)
        return {f: sim.rounding.flipped() for f, sim in sims.items()}
    finally:
        model.to(home)
        teacher.to(home)
        for f, sim in sims.items():
            _write_back(originals[f], sim)
        for f, q in originals.items():
            model.set_submodule(f, q)


def _write_back(q: nn.Module, sim: _SimLayer) -> None:
    r = sim.rounding
    scale = r.s[:, :1].clone()
    zp = None if q.zero_point is None else q.zero_point.clone()
    q.set_weight(QuantizedTensor(r.codes(), scale, zp, q.spec))


def _units(model: nn.Module, layers: set[str], granularity: str) -> list[str]:
    """Units in module order: each layer, or the outermost modules holding 1..MAX_BLOCK_LAYERS layers."""
    if granularity == "layer":
        return [f for f, _ in model.named_modules() if f in layers]
    units: list[str] = []

    def visit(fqn: str, module: nn.Module) -> None:
        n = sum(1 for f in layers if f == fqn or f.startswith(fqn + ".") or not fqn)
        if n == 0:
            return
        if fqn and n <= MAX_BLOCK_LAYERS:
            units.append(fqn)
            return
        for name, child in module.named_children():
            visit(f"{fqn}.{name}" if fqn else name, child)

    visit("", model)
    return units


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(
    model: nn.Module, unit: str, out: str | None, calib: list, device
) -> tuple[Tensor, Tensor | None]:
    """``unit``'s input (one tensor argument, samples stacked) over ``calib`` and, with ``out``, the
    output of module ``out``; the forward stops there."""
    xs, ys = [], []

    def seen_input(module, args):
        if len(args) != 1 or not isinstance(args[0], Tensor):
            raise LowbitError(f"cannot reconstruct {unit}: it takes {len(args)} arguments, not one tensor")
        xs.append(args[0].detach().float().to(device))
        if out is None:
            raise _Stop

    def seen_output(module, args, output):
        ys.append(output.detach().float().to(device))
        raise _Stop

    was = model.training
    model.eval()
    handles = [model.get_submodule(unit).register_forward_pre_hook(seen_input)]
    if out is not None:
        handles.append(model.get_submodule(out).register_forward_hook(seen_output))
    try:
        for batch in calib:
            try:
                _call(model, _to(batch, device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not xs:
        raise LowbitError(f"cannot reconstruct {unit}: no calibration batch reached it")
    return torch.cat(xs), (torch.cat(ys) if out is not None else None)


def _to(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _fit_unit(model, teacher, unit, out, members, calib, opts: Reconstruction, gen) -> None:
    """Train the roundings of ``members`` (the stand-ins inside ``unit``), then fix them."""
    device = gen.device
    x_fp, target = _capture(teacher, unit, out, calib, device)
    x_q, _ = _capture(model, unit, None, calib, device)
    layers = [m for m in members if isinstance(m, _SimLayer)]
    module = model.get_submodule(unit)
    run: Callable[[Tensor], Tensor] = module if out == unit else _through(model, unit, out)
    optim = torch.optim.Adam([m.rounding.v for m in layers], lr=opts.lr)
    before = _unit_loss(run, members, layers, x_q, target, opts.batch)  # round-to-nearest
    for m in members:
        m.drop = opts.drop
        m.train()
    n = x_q.shape[0]
    try:
        for step in range(opts.steps):
            idx = torch.randint(n, (min(opts.batch, n),), generator=gen, device=device)
            x = x_q[idx]
            if opts.drop > 0:
                x = torch.where(torch.rand(x.shape, generator=gen, device=device) < opts.drop, x_fp[idx], x)
            err = (run(x) - target[idx]).pow(2)
            loss = err.sum(1).mean() if err.dim() > 1 else err.mean()
            beta = beta_at(step, opts.steps)
            if beta is not None:
                loss = loss + LAMBDA * sum(m.rounding.penalty(beta) for m in layers)
            if not torch.isfinite(loss):
                raise LowbitError(f"reconstruction of {unit}: loss is {float(loss)} at step {step}")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    finally:
        for m in members:
            m.drop = 0.0
            m.eval()
        for m in layers:
            m.rounding.hard_mode = True
    if _unit_loss(run, members, layers, x_q, target, opts.batch) > before:
        for m in layers:  # learned rounding did worse on its own data than nearest: keep nearest
            m.rounding.reset()


@torch.no_grad()
def _unit_loss(run, members, layers, x: Tensor, target: Tensor, batch: int) -> float:
    """The reconstruction loss over all captured samples, hard rounding, every quantization on."""
    hard = [m.rounding.hard_mode for m in layers]
    for m in members:
        m.eval()
    for m in layers:
        m.rounding.hard_mode = True
    total = 0.0
    for i in range(0, x.shape[0], batch):
        err = (run(x[i : i + batch]) - target[i : i + batch]).pow(2)
        total += float(err.sum(1).sum() if err.dim() > 1 else err.sum())
    for m, h in zip(layers, hard, strict=True):
        m.rounding.hard_mode = h
    return total


def _through(model: nn.Module, unit: str, out: str) -> Callable[[Tensor], Tensor]:
    """A single fused layer: its stand-in then the (float) activation module ``out`` of the teacher's
    naming; in the quantized model that activation is ``nn.Identity`` and the output range clamps."""
    module = model.get_submodule(unit)
    act = model.get_submodule(out)
    return lambda x: act(module(x))
