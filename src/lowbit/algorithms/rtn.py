"""Round-to-nearest: qparams from the tensor's own min/max (or absmax), then round."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.primitives import choose_qparams, dequantize, quantize
from lowbit.core.spec import QuantSpec


@dataclass
class QuantizedTensor:
    """Unpacked result of a weight algorithm: ``codes`` has the weight's shape, qparams ``qparam_shape``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec, dtype)


def rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedTensor:
    """Quantize ``weight`` (any shape) to ``spec`` by round-to-nearest; ``name`` labels errors."""
    scale, zp = choose_qparams(weight, spec, name)
    return QuantizedTensor(quantize(weight, scale, zp, spec, name), scale, zp, spec)
