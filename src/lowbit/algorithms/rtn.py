"""Round-to-nearest: qparams from the tensor's own min/max (or absmax), then round."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.primitives import choose_qparams, dequantize, quantize
from lowbit.core.spec import QuantSpec


@dataclass
class QuantizedTensor:
    """Unpacked result of a weight algorithm: ``codes`` has the weight's shape, qparams ``qparam_shape``;
    ``levels`` the fitted table ``(rows or 1, 2**bits)`` of a table format (``lowbit.algorithms.kmeans``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    levels: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.levels is not None:
            return table_values(self.codes, self.scale, self.levels, dtype)
        return dequantize(self.codes, self.scale, self.zero_point, self.spec, dtype)


def table_values(
    codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``levels[row, code] * scale[row]`` of a table format's ``codes (rows, cols)``, in ``dtype``; a one-row
    ``levels``/``scale`` serves every row."""
    lv = levels.float().expand(codes.shape[0], -1)
    return (lv.gather(1, codes.long()) * scale.float()).to(dtype)


def rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedTensor:
    """Quantize ``weight`` (any shape) to ``spec`` by round-to-nearest; ``name`` labels errors. A table
    format's levels are fitted first (unweighted k-means, ``lowbit.algorithms.kmeans``)."""
    if spec.fmt.kind == "table":
        from lowbit.algorithms.kmeans import kmeans

        return kmeans(weight, spec, name=name)
    scale, zp = choose_qparams(weight, spec, name)
    return QuantizedTensor(quantize(weight, scale, zp, spec, name), scale, zp, spec)
