"""BatchNorm folding: the conv weights and bias that compute ``bn(conv(x))`` in one convolution.

For output channel ``c`` with BatchNorm statistics (running ``mean``, ``var``), affine ``gamma``, ``beta``
and ``eps``::

    k[c]  = gamma[c] / sqrt(var[c] + eps)
    W'[c] = W[c] * k[c]
    b'[c] = (b[c] - mean[c]) * k[c] + beta[c]          (b = 0 for a conv without bias)

exact in real arithmetic for BatchNorm in eval mode (running statistics).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(W', b')`` for conv ``weight (out, ...)``, ``bias (out,)`` or None and BatchNorm tensors ``(out,)``.

    Computed in float64, returned in ``weight.dtype``. ``gamma``/``beta`` None mean an affine-free BN.
    """
    k = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        k = k * gamma.double()
    b = bias.double() if bias is not None else torch.zeros_like(k)
    new_b = (b - mean.double()) * k
    if beta is not None:
        new_b = new_b + beta.double()
    new_w = weight.double() * k.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_w.to(weight.dtype), new_b.to(weight.dtype)
