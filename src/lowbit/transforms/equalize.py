"""``equalize_``: cross-layer equalization (``lowbit.algorithms.equalize``) of consecutive layer pairs in a
model, in place; ``equalization_pairs``: the pairs it finds; ``stretch_relu6_``: the ReLU6 pairs into a
per-channel reader (a depthwise conv) rescaled from calibration peaks instead.

A pair is two Conv2d (or two Linear) layers that run one after the other inside ``nn.Sequential``s,
nested plain Sequentials read as one flat sequence (torchvision-style ``Sequential(Conv, BN, ReLU)``
blocks), with nothing between them but ``nn.Identity`` (a folded BatchNorm) and at most one ReLU or
ReLU6: there layer 1's output reaches nothing but layer 2. Any other module (an unfolded BatchNorm,
pooling, a block with its own ``forward`` such as a residual) ends the chain. Run it after BatchNorm
folding, so that the BatchNorm scale is in the conv weights being equalized.

ReLU commutes with positive per-channel scaling, so equalization across it is exact in float.
ReLU6 does not (its clip at 6 would have to move to ``6 / s_i`` per channel): as in the paper and AIMET,
a pair across a ReLU6 is equalized only if that ReLU6 may become a plain ReLU (``replace_relu6``),
which changes the float model wherever an activation exceeded 6.

``stretch_relu6_`` keeps the ReLU6. For a pair whose second layer reads each input channel on its own
(a Conv2d with ``groups == in_channels``: depthwise), channel ``i`` whose ReLU6 output peaks at
``p_i < 6`` on the calibration batches is scaled up by ``s_i = min(6 / (1.5 p_i), 16)`` (at least 1) and
the depthwise filter of that channel down by ``s_i``. Float outputs stay the same wherever the activation
stays below 1.5 times its calibrated peak; a per-tensor activation grid then spends its codes on every
channel, not only on the loudest. The depthwise weights cost nothing: their scale is per channel anyway.
(A dense second layer would pay with coarser per-output-channel weight grids, and does not gain on
MobileNetV2: docs/static_w8a8.md.)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch
from torch import nn

from lowbit.algorithms.equalize import equalize_pair, scale_pair, stretch_scales
from lowbit.core.spec import PerChannel, QuantSpec
from lowbit.observers import make_observer
from lowbit.transforms.basis import record_on
from lowbit.transforms.calibrate import observing, run_batches

LAYERS = (nn.Conv2d, nn.Linear)
PER_CHANNEL = QuantSpec("uint8", False, PerChannel(1))  # peaks of (N, C, ...) activations, channel by channel
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


class EqualizedPair(NamedTuple):
    first: str
    second: str
    activation: str | None  # fqn of the ReLU/ReLU6 between them, None = none
    relu6: bool = False  # the activation was a ReLU6 (``equalize_`` replaces it by nn.ReLU)


def _plain(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _flat(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """Children of ``seq`` in run order, nested plain Sequentials expanded, as ``(fqn, module)``."""
    out = []
    for name, m in seq.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        out += _flat(fqn, m) if _plain(m) else [(fqn, m)]
    return out


def _reads(a: nn.Module, b: nn.Module) -> bool:
    """``b`` is the same kind of layer as ``a`` and reads as many channels as ``a`` writes."""
    if type(a) is nn.Conv2d and type(b) is nn.Conv2d:
        return a.out_channels == b.in_channels
    return type(a) is nn.Linear and type(b) is nn.Linear and a.out_features == b.in_features


def equalization_pairs(model: nn.Module) -> list[EqualizedPair]:
    """Every equalizable pair of ``model`` (see module docstring), in module order."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    pairs, plain = [], {n for n, m in model.named_modules() if _plain(m)}
    for prefix in plain:
        if prefix and prefix.rpartition(".")[0] in plain:
            continue  # read as part of its parent's flat sequence
        chain = [(n, m) for n, m in _flat(prefix, model.get_submodule(prefix)) if type(m) is not nn.Identity]
        for i, (n1, a) in enumerate(chain[:-1]):
            if type(a) not in LAYERS:
                continue
            act, j = None, i + 1
            if type(chain[j][1]) in ACTIVATIONS and j + 1 < len(chain):
                act, j = chain[j], j + 1
            n2, b = chain[j]
            if _reads(a, b):
                relu6 = act is not None and type(act[1]) is nn.ReLU6
                pairs.append(EqualizedPair(n1, n2, act[0] if act else None, relu6))
    return sorted(pairs, key=lambda p: order[p.first])


def _write_pair(a: nn.Module, b: nn.Module, w1, b1, w2) -> None:
    """Copy rescaled ``(W1, b1, W2)`` into layers ``a`` and ``b`` in place (no-grad callers)."""
    a.weight.copy_(w1)
    if b1 is not None:
        a.bias.copy_(b1)
    b.weight.copy_(w2)


@torch.no_grad()
def equalize_(
    model: nn.Module,
    replace_relu6: bool | Collection[str] = False,
    sweeps: int = 20,
    tol: float = 1e-4,
) -> list[EqualizedPair]:
    """Equalize every pair of ``equalization_pairs(model)`` in place; returns the pairs equalized.

    replace_relu6: True = every ReLU6 between a pair becomes ``nn.ReLU`` (same fqn) and its pair is
        equalized; a collection of fqns = only those ReLU6; False = pairs across a ReLU6 are left alone.
    sweeps, tol: pairs sharing a layer (chains ``a -> b -> c``) are equalized in turn, repeated until
        every scale of a sweep is within ``tol`` of 1 or ``sweeps`` sweeps ran.
    """
    pairs = [
        p
        for p in equalization_pairs(model)
        if not p.relu6 or replace_relu6 is True or (replace_relu6 and p.activation in replace_relu6)
    ]
    for p in pairs:
        if p.relu6:
            model.set_submodule(p.activation, nn.ReLU())
    for _ in range(sweeps):
        worst = 0.0
        for p in pairs:
            a, b = model.get_submodule(p.first), model.get_submodule(p.second)
            w1, b1, w2, s = equalize_pair(a.weight, a.bias, b.weight, getattr(b, "groups", 1))
            _write_pair(a, b, w1, b1, w2)
            record_on(model, p.first, rows=1.0 / s)
            record_on(model, p.second, inputs=s)
            worst = max(worst, float((s - 1).abs().max()))
        if worst <= tol:
            break
    return pairs


def stretch_pairs(model: nn.Module) -> list[EqualizedPair]:
    """Pairs ``layer -> ReLU6 -> Conv2d`` whose Conv2d reads each input channel alone (groups == in)."""
    out = []
    for p in equalization_pairs(model):
        b = model.get_submodule(p.second)
        if p.relu6 and isinstance(b, nn.Conv2d) and b.groups == b.in_channels:
            out.append(p)
    return out


@torch.no_grad()
def stretch_relu6_(
    model: nn.Module, calib, select=None, headroom: float = 1.5, cap: float = 16.0, progress: bool = False
) -> list[EqualizedPair]:
    """Rescale every ``stretch_pairs`` pair (``select(fqn)`` true for either layer) in place from the
    channel peaks ``calib`` reaches (one pass; see the module docstring); returns the pairs rescaled."""
    pairs = [p for p in stretch_pairs(model) if select is None or select(p.first) or select(p.second)]
    if not pairs:
        return []
    peaks = {p.activation: make_observer("minmax", PER_CHANNEL, name=p.activation) for p in pairs}
    with observing(model, {}, peaks):
        run_batches(model, calib, progress)
    for p in pairs:
        a, b = model.get_submodule(p.first), model.get_submodule(p.second)
        if peaks[p.activation].batches == 0:
            continue  # no calibration batch reached it
        s = stretch_scales(peaks[p.activation].range()[1], 6.0, headroom, cap)
        _write_pair(a, b, *scale_pair(a.weight, a.bias, b.weight, 1.0 / s, b.groups))
        record_on(model, p.first, rows=s)
        record_on(model, p.second, inputs=1.0 / s)
    return pairs
