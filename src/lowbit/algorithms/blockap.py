"""Block-wise training of quantized weights (EfficientQAT's Block-AP, Chen et al. 2024, in the spirit of
OmniQuant's learned weight clipping, Shao et al. 2024): learnable group qparams with straight-through
rounding, and a minibatch optimisation loop over a closure. Pure tensor math; the model walking is
``lowbit.transforms.block_train``.

An integer weight ``W (out, in)`` (any granularity ``QuantSpec`` lowers to a block size) trains as
``Learned`` float32 tensors: a latent ``u`` of ``W``'s shape in grid steps of its block's scale
(``W = u * s``), and per block (``qparam_shape``) the starting scale ``s0``, ``log_ratio = log(s / s0)``
and a zero point::

    s = cast(clamp(s0 * exp(log_ratio)))            # to spec.scale_dtype and back; gradient through
    z = clamp(round(zero_point), qmin, qmax)        # round: gradient 1 (straight-through)
    q = clamp(round(u) + z, qmin, qmax)             # round: gradient 1; clamp: 0 outside the range
    W' = (q - z) * s

The scale lives in the log domain (positive, and an Adam step moves it by a fraction, not an amount),
relative to where it started (``exp(0) = 1``: step 0 has the starting scales exactly, float32 ones
too); the zero point stays continuous and is rounded in the forward. With ``u`` in grid steps, one
learning rate means the same fraction of a step on every layer and model, and ``dW'/ds = q - z``: the
scale refits the codes it multiplies. (With a latent in weight units, ``q = round(W / s)``, LSQ's scale
gradient is ``round(W / s) - W / s``, zero where training starts from a rounded weight, so Adam drives
the scales with float noise, and scale-only training raises the block output error.)

``W'`` is computed with the float32 operations ``lowbit.core.primitives.dequantize`` runs, in its order
(the straight-through terms ``x + (r - x)`` are exact), so it equals ``freeze(...).dequantize()`` bit
for bit, and ``quantize`` gives ``freeze``'s codes back from it (on-grid values round-trip). Symmetric
specs keep their zero point fixed (``learnable`` leaves it without gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import from_blocks, to_blocks
from lowbit.core.spec import QuantSpec


class Learned(NamedTuple):
    """The tensors one weight trains with (module docstring); ``scale0`` stays fixed."""

    u: Tensor
    scale0: Tensor
    log_ratio: Tensor
    zero_point: Tensor


def _ste_round(x: Tensor) -> Tensor:
    """``round(x)`` (half to even, as ``quantize``) in the forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def _int_spec(spec: QuantSpec) -> None:
    if spec.fmt.kind != "int":
        raise LowbitError(f"learned qparams take integer formats, not {spec.format}")


def learnable(weight: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec) -> Learned:
    """Float32 leaves that ``fake_quantize_learned`` starts from: ``weight`` in grid steps of ``scale``,
    with those qparams, so step 0 rounds ``weight`` to nearest under them (a weight already rounded to
    them, e.g. GPTQ's dequantized result, comes back exactly). The zero point requires grad unless
    ``spec`` is symmetric."""
    _int_spec(spec)
    shape = tuple(weight.shape)
    block = spec.block_size(shape)
    scale = scale.float()
    zp = zero_point.float() if zero_point is not None else torch.zeros_like(scale)
    u = from_blocks(to_blocks(weight.detach().float(), block) / scale[..., None], shape, block)
    ratio = torch.zeros_like(scale)
    return Learned(u.contiguous(), scale.clone(), ratio, zp.clone().requires_grad_(not spec.symmetric))


def scale_of(p: Learned, spec: QuantSpec) -> Tensor:
    """float32 values of the stored scales ``s0 * exp(log_ratio)`` (``spec.scale_dtype``, clamped to its
    normal range as ``choose_qparams`` clamps), with the gradient of ``s0 * exp(log_ratio)``."""
    info = torch.finfo(spec.torch_scale_dtype)
    s = (p.scale0 * p.log_ratio.exp()).clamp(info.tiny, info.max)
    return s + (s.to(spec.torch_scale_dtype).float() - s).detach()


class _OnGrid(torch.autograd.Function):
    """``(clamp(round(u) + z, qmin, qmax) - z) * s`` on blocks ``u (G, n)`` with ``s``, ``z`` ``(G, 1)``:
    ``dequantize``'s arithmetic, with the straight-through gradients of the module docstring written
    out (``du = s`` inside the range, ``ds = q - z``, ``dz = -s`` where clamped): a third of the
    elementwise passes autograd makes of the same formula."""

    @staticmethod
    def forward(ctx, ub: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
        d = torch.round(ub).add_(z)
        clamped = (d < qmin) | (d > qmax)
        d.clamp_(qmin, qmax).sub_(z)
        ctx.save_for_backward(d, clamped, s)
        return d * s

    @staticmethod
    def backward(ctx, g: Tensor):
        d, clamped, s = ctx.saved_tensors
        du = (g * s).masked_fill_(clamped, 0.0) if ctx.needs_input_grad[0] else None
        ds = (g * d).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        dz = None
        if ctx.needs_input_grad[2]:
            dz = torch.where(clamped, g, 0.0).sum(-1, keepdim=True).mul_(s).neg_()
        return du, ds, dz, None, None


def _blocks(p: Learned, spec: QuantSpec) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``(ub, z, block)``: ``u`` as blocks ``(*qparam_shape, n)`` (padding 0) and the rounded zero points."""
    fmt, shape = spec.fmt, tuple(p.u.shape)
    block = spec.block_size(shape)
    z = p.zero_point
    if z.requires_grad:
        z = _ste_round(z).clamp(fmt.qmin, fmt.qmax)
    ub = to_blocks(p.u.float(), block)
    if ub.numel() != p.u.numel():  # a partial last block: its padding (NaN) counts as 0
        ub = torch.nan_to_num(ub, nan=0.0)
    return ub, z, block


def fake_quantize_learned(p: Learned, spec: QuantSpec) -> Tensor:
    """``W'`` of the module docstring: float32 of ``u``'s shape; differentiable in ``u``, ``log_ratio``
    and ``zero_point``."""
    _int_spec(spec)
    ub, z, block = _blocks(p, spec)
    w = _OnGrid.apply(ub, scale_of(p, spec)[..., None], z[..., None], spec.fmt.qmin, spec.fmt.qmax)
    return from_blocks(w, tuple(p.u.shape), block)


def freeze(p: Learned, spec: QuantSpec) -> QuantizedTensor:
    """The trained weight as lowbit stores it: codes (code dtype), scale in ``spec.scale_dtype``,
    integer zero point; ``dequantize`` gives ``fake_quantize_learned``'s value bit for bit."""
    _int_spec(spec)
    fmt = spec.fmt
    with torch.no_grad():
        ub, z, block = _blocks(p, spec)
        q = torch.clamp(torch.round(ub) + z[..., None], fmt.qmin, fmt.qmax)
        codes = from_blocks(q, tuple(p.u.shape), block).to(fmt.torch_dtype)
        scale = scale_of(p, spec).to(spec.torch_scale_dtype)
        return QuantizedTensor(codes, scale, z.to(fmt.torch_dtype), spec)


def cosine(step: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: half a cosine from 1 down to 0, no warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def optimise(
    groups: Sequence[dict],
    loss_of: Callable[[Tensor], Tensor],
    n_items: int,
    *,
    epochs: int,
    batch: int,
    seed: int = 0,
    name: str = "block",
) -> list[float]:
    """Minimise ``loss_of(items)`` with AdamW (no weight decay) over ``epochs`` passes of ``n_items``
    items, each pass a seeded permutation cut into minibatches of ``batch`` (the last may be smaller);
    ``loss_of`` gets a LongTensor of item indices and returns a scalar loss. ``groups``: torch param
    groups (``{"params": [...], "lr": peak}``), every lr on one cosine schedule per step.
    Returns the mean loss of each epoch. A NaN or Inf loss raises ``LowbitError`` naming ``name``, the
    epoch and the step (parameters are left as they were before that step)."""
    if epochs < 1 or batch < 1 or n_items < 1:
        raise LowbitError(f"{name}: epochs, batch and items must be positive ({epochs}, {batch}, {n_items})")
    groups = [dict(g, weight_decay=0.0, initial_lr=g["lr"]) for g in groups]
    opt = torch.optim.AdamW(groups)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n_items / batch)
    total, step, history = epochs * per_epoch, 0, []
    for epoch in range(epochs):
        losses = []
        for items in torch.randperm(n_items, generator=gen).split(batch):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * cosine(step, total)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(items)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LowbitError(
                    f"{name}: training loss is {value} at epoch {epoch + 1}, step {step + 1} of {total} "
                    "(lower the learning rate, or use another method)"
                )
            loss.backward()
            opt.step()
            losses.append(value)
            step += 1
        history.append(sum(losses) / len(losses))
    return history
