"""``fold_batchnorm_``: fold each BatchNorm2d into the Conv2d that feeds it, in place; and
``fusable_activations``: the ReLU/ReLU6 that directly follow given layers.

A pair is folded when the two modules are consecutive children of one ``nn.Sequential`` (as in
torchvision-style ``Conv2d, BatchNorm2d, ReLU`` blocks): there the conv's output reaches nothing but the
BatchNorm. The conv takes the folded weight and bias (``lowbit.algorithms.fold``) and the BatchNorm
becomes ``nn.Identity``, so module names (and checkpoints keyed by them) keep their positions.
BatchNorms elsewhere are left as they are and reported by the caller.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.fold import fold_bn


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv fqn, bn fqn)`` of every foldable pair (see module docstring)."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for (n1, a), (n2, b) in zip(kids, kids[1:], strict=False):
            if (
                isinstance(a, nn.Conv2d)
                and isinstance(b, nn.BatchNorm2d)
                and b.num_features == a.out_channels
                and b.track_running_stats
            ):
                pairs.append((f"{prefix}.{n1}" if prefix else n1, f"{prefix}.{n2}" if prefix else n2))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm2d into its conv (eval-mode semantics); returns the folded pairs."""
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        conv.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        model.set_submodule(bn_name, nn.Identity())
    return pairs


FUSABLE = (nn.ReLU, nn.ReLU6)


def fusable_activations(model: nn.Module, fqns) -> dict[str, str]:
    """``{layer fqn: activation fqn}`` for layers of ``fqns`` whose next sibling in an ``nn.Sequential``
    (``nn.Identity`` left by folding skipped) is a ReLU or ReLU6: there the layer's output reaches
    nothing but the activation, so a quantized output range that starts at 0 can stand for both."""
    wanted, out = set(fqns), {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = [(f"{prefix}.{n}" if prefix else n, m) for n, m in seq.named_children()]
        for i, (name, _) in enumerate(kids):
            if name not in wanted:
                continue
            rest = [(n, m) for n, m in kids[i + 1 :] if type(m) is not nn.Identity]
            if rest and type(rest[0][1]) in FUSABLE:
                out[name] = rest[0][0]
    return out
