"""Calibration-free HQQ-style weight quantization (half-quadratic, Badri & Shaji 2023), integer zero points.

HQQ minimises ``||W - dequant(quant(W))||_p`` (``p < 1``: heavy-tailed errors, outliers cost little) per
block by half-quadratic splitting: an auxiliary error ``W_e`` is shrunk by generalised soft-thresholding,
then a qparam gets its closed-form least-squares update against ``W - W_e``; ``beta`` grows by ``kappa``
per step, each block keeps its best iterate by mean ``|error|`` and the loop stops once no block improves.

HQQ updates a float zero point with the scale fixed. lowbit stores an integer zero point, and rounding
HQQ's undoes it: the float zero point moves by a small fraction of a step, so the rounded one nearly
always equals RTN's. Here the half-quadratic step updates the continuous qparam left, the scale, for
the integer zero points ``z_rtn`` and (asymmetric specs) ``z_rtn +- 1``; then ``refine`` rounds of
``codes = quantize(W)`` and a least-squares refit of the scale given the codes
(``s = <w, q - z> / <q - z, q - z>`` over real elements) follow.

Every candidate (RTN included) is scored by the L2 error of exactly what ``dequantize`` returns (scale cast
to ``spec.scale_dtype``); each block keeps its best, RTN on ties, so the result is never worse than RTN per
block. All blocks are processed at once.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import LowbitError
from lowbit.core.primitives import choose_qparams, quantize, to_blocks
from lowbit.core.spec import QuantSpec

Tensor = torch.Tensor


def hqq(
    weight: Tensor,
    spec: QuantSpec,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    refine: int = 3,
    name: str = "weight",
) -> QuantizedTensor:
    """Quantize ``weight`` (``(out, in)``; any shape works, blocks follow ``spec``) with HQQ-style qparams.

    ``iters``: half-quadratic steps per zero point; ``lp_norm``: ``p`` of the error norm, in (0, 1];
    ``beta``/``kappa``: initial shrinkage weight and its growth per step; ``refine``: least-squares
    scale refits after the half-quadratic steps. Integer formats only. The result has the
    layout of ``rtn`` (codes ``weight.shape``, qparams ``qparam_shape``) and, per block, an L2
    reconstruction error no larger than RTN's.
    """
    _check_args(spec, iters, lp_norm, beta, kappa, refine)
    scale, zp = choose_qparams(weight, spec, name)
    # padding (a group not dividing the axis) becomes 0: it quantizes to code z, so adds 0 everywhere
    w = torch.nan_to_num(to_blocks(weight.detach().float(), spec.block_size(tuple(weight.shape))), nan=0.0)
    s0, z0 = scale.float()[..., None], zp.float()[..., None]
    best = (s0, z0, _l2(w, s0, z0, spec))
    shifts = (0,) if spec.symmetric else (0, -1, 1)
    for dz in shifts:
        z = (z0 + dz).clamp(spec.fmt.qmin, spec.fmt.qmax)
        s = _cast_scale(_hq_scale(w, s0, z, spec, iters, lp_norm, beta, kappa), spec)
        for _ in range(refine + 1):
            best = _keep(best, s, z, _l2(w, s, z, spec))
            s = _cast_scale(_fit(w, _centred_codes(w, s, z, spec), s), spec)
    scale = best[0][..., 0].to(spec.torch_scale_dtype)
    zp = best[1][..., 0].to(spec.fmt.torch_dtype)
    return QuantizedTensor(quantize(weight, scale, zp, spec, name), scale, zp, spec)


def _keep(best: tuple[Tensor, Tensor, Tensor], s: Tensor, z: Tensor, err: Tensor):
    """Per block, ``(s, z, err)`` where ``err`` is strictly lower than the best so far, else the best."""
    better = err < best[2]
    return torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.where(better, err, best[2])


def _check_args(spec: QuantSpec, iters: int, lp_norm: float, beta: float, kappa: float, refine: int) -> None:
    if spec.fmt.kind != "int":
        raise LowbitError(f"hqq needs an integer format, got {spec.format}")
    if iters < 0 or refine < 0:
        raise LowbitError(f"iters and refine must be >= 0, got {iters} and {refine}")
    if not 0.0 < lp_norm <= 1.0:
        raise LowbitError(f"lp_norm must be in (0, 1], got {lp_norm}")
    if beta <= 0.0 or kappa < 1.0:
        raise LowbitError(f"need beta > 0 and kappa >= 1, got beta={beta}, kappa={kappa}")


def _centred_codes(w: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> Tensor:
    """``quantize``'s codes minus ``z`` (float32); ``w`` is ``(..., block)``, ``s``/``z`` ``(..., 1)``."""
    return torch.clamp(torch.round(w / s) + z, spec.fmt.qmin, spec.fmt.qmax) - z


def _l2(w: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> Tensor:
    """Sum of squared reconstruction errors per block (float64), as ``dequantize`` would give them."""
    return (w - _centred_codes(w, s, z, spec) * s).double().square().sum(-1, keepdim=True)


def _shrink(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalised soft-thresholding: the proximal step of ``|x|^p / beta``."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.add(1e-8).pow(p - 1.0) / beta)


def _cast_scale(s: Tensor, spec: QuantSpec) -> Tensor:
    """``s`` rounded to ``spec.scale_dtype`` and clamped to its positive finite range, back in float32."""
    info = torch.finfo(spec.torch_scale_dtype)
    return s.clamp(info.tiny, info.max).to(spec.torch_scale_dtype).float()


def _hq_scale(w: Tensor, s: Tensor, z: Tensor, spec: QuantSpec, iters: int, p: float, beta: float,
              kappa: float) -> Tensor:  # fmt: skip
    """Half-quadratic steps on the scale (zero point ``z`` fixed); the best iterate by ``sum |error|``."""
    best_s, best = s, torch.full_like(s, float("inf"))
    for _ in range(iters):
        q = _centred_codes(w, s, z, spec)
        d = w - q * s
        err = d.abs().sum(-1, keepdim=True)
        better = err < best
        if not bool(better.any()):
            break
        best, best_s = torch.where(better, err, best), torch.where(better, s, best_s)
        s = _fit(w - _shrink(d, beta, p), q, s)
        beta *= kappa
    return best_s


def _fit(target: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """Least-squares scale ``<target, q> / <q, q>`` per block; ``s`` where that is not positive/finite."""
    den = q.square().sum(-1, keepdim=True)
    new = (target * q).sum(-1, keepdim=True) / den
    return torch.where((den > 0) & (new > 0) & torch.isfinite(new), new, s)
