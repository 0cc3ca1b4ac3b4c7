"""``QLinearOutlier``: W8A8 dynamic with a few outlier input columns kept in float (LLM.int8).

Buffers, for a Linear ``(out_features, in_features)`` with ``k`` outlier input channels:

| buffer           | shape                          | dtype                                   |
|------------------|--------------------------------|-----------------------------------------|
| `qweight`        | ``(out, stored_bytes(in - k))``| uint8 (rest columns, as ``QLinear``'s)  |
| `scale`          | ``(out, 1)`` per channel       | ``spec.scale_dtype``                    |
| `zero_point`     | same as `scale`                | int8 (0: symmetric)                     |
| `bias`           | ``(out,)``                     | the layer dtype                         |
| `outlier_idx`    | ``(k,)``                       | int64, sorted input channels            |
| `rest_idx`       | ``(in - k,)``                  | int64, sorted: the other channels       |
| `outlier_weight` | ``(out, k)``                   | ``outlier_dtype`` (float16 or float32)  |

The rest columns run the same ``dynamic_linear`` kernel op as ``QDynamicLinear`` (``rows, cols`` of this
module are ``out, in - k``); the outlier product runs in the promoted dtype of ``x`` and ``outlier_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from lowbit.algorithms.outliers import rest_channels, split_columns
from lowbit.algorithms.rtn import rtn
from lowbit.core.errors import LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.kernels import dispatch
from lowbit.kernels.ops import call
from lowbit.kernels.reference import DYNAMIC_ACTIVATIONS
from lowbit.nn.modules import QuantizedWeightModule, register_qmodule
from lowbit.nn.static import WEIGHT_SPEC


@register_qmodule(None)
class QLinearOutlier(QuantizedWeightModule):
    """``y = W8A8(x[..., rest_idx]) + x[..., outlier_idx] @ outlier_weight.T + b``."""

    KERNEL_OP = "dynamic_linear"  # what the rest columns run (lowbit.kernels)
    ENTRY_FIELDS = QuantizedWeightModule.ENTRY_FIELDS | {
        "in_features": "dim",
        "out_features": "dim",
        "n_outliers": "dim",
        "bias": "bool",
        "outlier_dtype": "dtype",
    }
    act_spec = DYNAMIC_ACTIVATIONS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_outliers: int,
        spec: QuantSpec = WEIGHT_SPEC,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        outlier_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= n_outliers < in_features:
            raise LowbitError(f"n_outliers must be in [0, {in_features}), got {n_outliers}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.rows, self.cols = out_features, in_features - n_outliers
        self._init_weight_buffers(spec, dtype)
        odt = outlier_dtype or dtype
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("outlier_idx", torch.arange(n_outliers))
        self.register_buffer("rest_idx", torch.arange(n_outliers, in_features))
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, dtype=odt))

    @property
    def n_outliers(self) -> int:
        return self.in_features - self.cols

    @classmethod
    def from_float(
        cls,
        m: nn.Linear,
        outlier_idx: torch.Tensor,
        spec: QuantSpec = WEIGHT_SPEC,
        *,
        outlier_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> QLinearOutlier:
        """Filled from ``m`` (unlike ``QLinear.from_float``: the split needs the float weight); the rest
        columns are quantized by RTN to ``spec``, ``outlier_idx (k,)`` columns kept in ``outlier_dtype``."""
        w = m.weight.detach()
        w_out, w_rest, _ = split_columns(w, outlier_idx)
        q = cls(m.in_features, m.out_features, w_out.shape[1], spec, m.bias is not None, w.dtype,
                outlier_dtype, backend)  # fmt: skip
        q.set_outliers(outlier_idx, w_out)
        q.set_weight(rtn(w_rest, spec))
        if m.bias is not None:
            q.bias = m.bias.detach().clone()
        return q

    def set_outliers(self, outlier_idx: torch.Tensor, weight: torch.Tensor) -> None:
        """Store outlier channels ``outlier_idx (k,)`` (any order) and their float columns ``(out, k)``."""
        idx = outlier_idx.reshape(-1).to(torch.int64)
        if idx.numel() != self.n_outliers or tuple(weight.shape) != (self.out_features, self.n_outliers):
            raise LowbitError(
                f"QLinearOutlier: {idx.numel()} indices / weight {tuple(weight.shape)} do not fit "
                f"{self.n_outliers} outliers of a {self.out_features}x{self.in_features} layer"
            )
        order = torch.argsort(idx)
        self.outlier_idx = idx[order].to(self.qweight.device)
        self.rest_idx = rest_channels(self.in_features, self.outlier_idx)
        self.outlier_weight = weight[:, order.to(weight.device)].to(self.outlier_weight.dtype).contiguous()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float weight ``(out_features, in_features)``, outlier columns included."""
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        w[:, self.rest_idx] = super().dequantized_weight(dtype)
        w[:, self.outlier_idx] = self.outlier_weight.to(dtype)
        return w

    def state_problem(self) -> str | None:
        both = torch.cat([self.outlier_idx, self.rest_idx]).sort().values
        if not torch.equal(both, torch.arange(self.in_features, device=both.device)):
            return "outlier_idx and rest_idx do not split the input columns"
        if not bool(torch.isfinite(self.outlier_weight).all()):
            return "outlier_weight holds NaN or Inf"
        return super().state_problem()

    @classmethod
    def from_entry(cls, e: dict) -> QLinearOutlier:
        spec, dtype = QuantSpec.from_dict(e["spec"]), getattr(torch, e["dtype"])
        odt = getattr(torch, e["outlier_dtype"])
        return cls(e["in_features"], e["out_features"], e["n_outliers"], spec, e["bias"], dtype, odt)

    def config_entry(self) -> dict:
        return super().config_entry() | {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n_outliers": self.n_outliers,
            "bias": self.bias is not None,
            "outlier_dtype": str(self.outlier_weight.dtype)[6:],
        }

    def extra_repr(self) -> str:
        odt = str(self.outlier_weight.dtype)[6:]
        return super().extra_repr() + f", {self.n_outliers} outlier columns in {odt}, activations per token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr, xo = x.index_select(-1, self.rest_idx), x.index_select(-1, self.outlier_idx)
        dt = torch.promote_types(x.dtype, self.outlier_weight.dtype)
        y = (
            call(self.KERNEL_OP, self, xr)
            if is_compiling()
            else dispatch(self.KERNEL_OP, self, xr, self.backend)(xr, self)
        )
        return (y.to(dt) + F.linear(xo.to(dt), self.outlier_weight.to(dt))).to(x.dtype)
