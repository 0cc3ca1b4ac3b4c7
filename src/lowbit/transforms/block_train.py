"""Block-wise quantization-aware training of one decoder block (``WeightOnly(method="qat")``; the math is
``lowbit.algorithms.blockap``), called by ``lowbit.transforms.block.quantize_block`` between the initial
rounding and the forward that gives the next block's inputs.

The targets are the FLOAT block's outputs on the block's calibration inputs (the quantized earlier
blocks' outputs), taken before anything in the block changes. Each rounded Linear becomes a
``_Trainee`` (``blockap.Learned``): its latent weight, in grid steps, starts at the values GPTQ rounded
(the weight after GPTQ's error feedback, ``gptq(return_values=True)``; other roundings: their dequantized
weight), so step 0 is the initial rounding exactly while the weights GPTQ left near a rounding boundary
can cross it; its group scales (log domain) and zero points start at the rounding's qparams. AdamW on a
cosine schedule minimises the mean squared error of the block output against the targets over
minibatches of calibration samples (rows of the stacked forwards); the other block parameters (norms)
stay fixed. The trained weights are then rounded with the trained qparams into the swapped
``QLinear``s, unless the block output error on all calibration tokens came out no lower than the
initial rounding's, in which case that rounding is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.blockap import Learned, fake_quantize_learned, freeze, learnable, optimise
from lowbit.nn.modules import QLinear


@dataclass(frozen=True)
class Training:
    """Options of the block training (``WeightOnly`` ``train_*`` fields).

    epochs: passes over the calibration samples. lr: peak learning rate of the latent weights (in grid
    steps: 0.01 moves a weight by about a hundredth of its step per Adam step). qparam_lr: peak learning
    rate of the log scales and zero points. batch: calibration samples (rows of the stacked
    calibration forwards) per step. target: "block", the float block's outputs on the block's own
    (quantized) inputs, or "model", the float model's outputs of the block (its inputs from the float
    blocks before: the block also learns to undo the error it receives, as EfficientQAT and OmniQuant
    train)."""

    epochs: int = 2
    lr: float = 3e-3
    qparam_lr: float = 1e-2
    batch: int = 4
    target: str = "block"


class _Trainee(nn.Module):
    """Stands in for a rounded Linear while its block trains: ``F.linear`` with the fake-quantized
    latent weight (``blockap.fake_quantize_learned``)."""

    def __init__(self, q: QLinear, bias: torch.Tensor | None, start: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = q.spec
        start = q.dequantized_weight(torch.float32) if start is None else start
        p = learnable(start, q.scale, q.zero_point, q.spec)
        self.latent = nn.Parameter(p.u)  # in grid steps of the scales
        self.register_buffer("scale0", p.scale0)
        self.log_ratio = nn.Parameter(p.log_ratio)
        self.zero_point = nn.Parameter(p.zero_point, requires_grad=p.zero_point.requires_grad)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def learned(self) -> Learned:
        return Learned(self.latent, self.scale0, self.log_ratio, self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_learned(self.learned(), self.spec)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def qparams(self) -> list[nn.Parameter]:
        return [p for p in (self.log_ratio, self.zero_point) if p.requires_grad]


def _take(value, rows: torch.Tensor, batch: int):
    """``value`` (a block keyword argument) for the rows ``rows`` of a stacked forward of ``batch``
    rows: tensors whose first dim is that batch are indexed, tuples recursed, the rest kept."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and batch > 1:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_take(v, rows, batch) for v in value)
    return value


def _output(y) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


class _Loss:
    """Mean squared error of ``block``'s outputs against ``targets`` on calibration samples; sample ``k``
    is row ``rows[k]`` of stacked forward ``chunk[k]``."""

    def __init__(self, block: nn.Module, hidden: list, kwargs: list[dict], targets: list) -> None:
        self.block, self.hidden, self.kwargs, self.targets = block, hidden, kwargs, targets
        self.chunk = torch.cat([torch.full((h.shape[0],), j) for j, h in enumerate(hidden)])
        self.rows = torch.cat([torch.arange(h.shape[0]) for h in hidden])

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        sse, n = 0.0, 0
        for j in self.chunk[items].unique().tolist():
            rows = self.rows[items[self.chunk[items] == j]]
            h, t, b = self.hidden[j], self.targets[j], self.hidden[j].shape[0]
            kw = {k: _take(v, rows, b) for k, v in self.kwargs[j].items()}
            y = _output(self.block(h[rows], **kw))
            sse = sse + (y.float() - t[rows].float()).pow(2).sum()
            n += y.numel()
        return sse / n

    @torch.no_grad()
    def total(self) -> float:
        """The error on every calibration token, one stacked forward at a time."""
        sse, n = 0.0, 0
        for h, t, kw in zip(self.hidden, self.targets, self.kwargs, strict=True):
            y = _output(self.block(h, **kw))
            sse += float((y.float() - t.float()).pow(2).sum())
            n += y.numel()
        return sse / n


def train_block(
    block: nn.Module,
    swaps: dict[str, QLinear],
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    options: Training,
    name: str,
    compute: Callable[[], AbstractContextManager],
    starts: dict[str, torch.Tensor] | None = None,
) -> str:
    """Train the rounded Linears ``swaps`` (block-relative name -> its ``QLinear``, whose float stand-in
    sits in ``block``) against the float block's ``targets`` (module docstring) and store the result in
    the ``QLinear``s; the stand-ins are put back. ``compute``: context of the block's forwards
    (``block._compute``). ``name`` labels errors (a non-finite loss: ``LowbitError`` naming it).
    Returns what happened, e.g. ``"block output mse 0.0123 -> 0.00456"``."""
    stand_ins = {n: block.get_submodule(n) for n in swaps}
    starts = starts or {}
    trainees = {n: _Trainee(q, stand_ins[n].bias, starts.get(n)) for n, q in swaps.items()}
    fixed = [p for p in block.parameters() if p.requires_grad]
    loss = _Loss(block, hidden, kwargs, targets)
    try:
        for p in fixed:
            p.requires_grad_(False)
        for n, t in trainees.items():
            block.set_submodule(n, t)
        with compute():
            before = loss.total()
            weights = [t.latent for t in trainees.values()]
            qparams = [p for t in trainees.values() for p in t.qparams()]
            groups = [{"params": weights, "lr": options.lr}, {"params": qparams, "lr": options.qparam_lr}]
            opts = {"epochs": options.epochs, "batch": options.batch, "name": name}
            optimise(groups, loss, len(loss.rows), **opts)
            after = loss.total()
    finally:
        for n, m in stand_ins.items():
            block.set_submodule(n, m)
        for p in fixed:
            p.requires_grad_(True)
    if not after < before:
        return f"block output mse {before:.4g} -> {after:.4g}: kept the initial rounding"
    for n, t in trainees.items():
        swaps[n].set_weight(freeze(t.learned(), t.spec))
    return f"block output mse {before:.4g} -> {after:.4g}"
