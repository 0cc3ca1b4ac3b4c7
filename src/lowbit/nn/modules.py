"""Quantized modules: plain buffers (stored codes, scale, zero point) and one-line forwards.

Buffers of a module whose float weight is ``(rows, cols)`` quantized to ``spec``:

| buffer       | shape                                  | dtype                               |
|--------------|----------------------------------------|-------------------------------------|
| `qweight`    | ``(rows, stored_bytes(cols, fmt))``    | uint8 (bit-packed rows, see codec)  |
| `scale`      | ``qparam_shape((rows, cols), block)``  | ``spec.scale_dtype``                |
| `zero_point` | same as `scale` (int formats only)     | int8 / uint8 (the code dtype)       |
| `levels`     | ``(rows or 1, 2**bits)`` (table formats)| ``spec.scale_dtype``, in [-1, 1]   |

Rows are output channels for ``QLinear`` and table rows for ``QEmbedding``, so a tied embedding and
LM head share one set of buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.compiler import is_compiling

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.codec import encode, stored_bytes
from lowbit.core.errors import LowbitError
from lowbit.core.spec import PerChannel, PerGroup, PerTensor, QuantSpec, qparam_shape
from lowbit.kernels import dispatch
from lowbit.kernels.ops import REF_ATTR, attach, call
from lowbit.kernels.reference import dequantize_weight

QMODULES: dict[str, type[QuantizedModule]] = {}
FLOAT_TO_Q: dict[type[nn.Module], type[QuantizedWeightModule]] = {}


def register_qmodule(float_type: type[nn.Module] | None) -> Callable:
    """Class decorator: ``cls`` can be saved and loaded by name and, unless ``float_type`` is None, is
    the default quantized counterpart of ``float_type``."""

    def deco(cls):
        QMODULES[cls.__name__] = cls
        if float_type is not None:
            FLOAT_TO_Q[float_type] = cls
        return cls

    return deco


class QuantizedModule(nn.Module):
    """Base of every module ``lowbit.save`` records: ``config_entry()`` -> dict, ``from_entry(dict)``.

    ``ENTRY_FIELDS``: field -> kind of every key ``config_entry`` writes besides ``type`` (kinds:
    ``lowbit.export.validate``), checked before ``from_entry`` sees a loaded entry."""

    ENTRY_FIELDS: dict[str, str] = {}

    def config_entry(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_entry(cls, entry: dict) -> QuantizedModule:
        raise NotImplementedError

    def state_problem(self) -> str | None:
        """What is wrong with loaded buffers (a scale not finite and positive, a zero point out of its
        format's range, ...), or None; ``lowbit.load`` refuses a checkpoint with a problem."""
        return None


def scale_problem(name: str, scale: torch.Tensor) -> str | None:
    """A message if ``scale`` has an element that is not finite and positive, else None."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        return f"{name} {float(scale[bad].flatten()[0])} at {at} is not finite and positive"
    return None


class QuantizedWeightModule(QuantizedModule):
    """Base: a ``(rows, cols)`` weight held as ``qweight``/``scale``/``zero_point`` buffers."""

    rows: int
    cols: int
    ENTRY_FIELDS = {"spec": "spec", "dtype": "dtype"}

    def _init_weight_buffers(self, spec: QuantSpec, dtype: torch.dtype) -> None:
        shape = (self.rows, self.cols)
        qshape = qparam_shape(shape, spec.block_size(shape))
        fmt = spec.fmt
        self.spec = spec
        self.dtype = dtype
        self.register_buffer(
            "qweight", torch.zeros(self.rows, stored_bytes(self.cols, fmt), dtype=torch.uint8)
        )
        self.register_buffer("scale", torch.ones(qshape, dtype=spec.torch_scale_dtype))
        zp = torch.zeros(qshape, dtype=fmt.torch_dtype) if fmt.kind == "int" else None
        self.register_buffer("zero_point", zp)
        if fmt.kind == "table":  # one table per output channel (PerChannel) or per tensor
            n_tables = qshape[0]
            self.register_buffer("levels", torch.zeros(n_tables, fmt.n_codes, dtype=spec.torch_scale_dtype))
        else:
            self.levels = None
        attach(self)  # how a compiled forward's kernel op finds this module (lowbit.kernels.ops)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop(REF_ATTR, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        attach(self)  # a copy's own reference, not the original's

    def set_weight(self, qt: QuantizedTensor) -> None:
        """Store an algorithm's result (codes ``(rows, cols)``) into the buffers."""
        if tuple(qt.codes.shape) != (self.rows, self.cols) or qt.spec != self.spec:
            raise LowbitError(f"{type(self).__name__}: weight {tuple(qt.codes.shape)}/{qt.spec} does not fit")
        self.qweight = encode(qt.codes, self.spec.fmt)
        self.scale = qt.scale.contiguous()
        self.zero_point = qt.zero_point.contiguous() if qt.zero_point is not None else None
        if self.spec.fmt.kind == "table":
            self.levels = qt.levels.to(self.spec.torch_scale_dtype).contiguous()

    def share_weight(self, other: QuantizedWeightModule) -> None:
        """Use ``other``'s buffers (tied weights): one stored copy, two modules."""
        if (other.rows, other.cols, other.spec) != (self.rows, self.cols, self.spec):
            raise LowbitError("tied modules must have the same weight shape and spec")
        self.qweight, self.scale, self.zero_point = other.qweight, other.scale, other.zero_point
        if self.spec.fmt.kind == "table":
            self.levels = other.levels

    def state_problem(self) -> str | None:
        problem = scale_problem("scale", self.scale)
        if problem:
            return problem
        levels = self.levels
        if levels is not None and not bool((torch.isfinite(levels) & (levels.abs() <= 1)).all()):
            return "levels hold values outside [-1, 1] (or NaN/Inf)"
        fmt, zp = self.spec.fmt, self.zero_point
        if zp is not None and zp.numel():
            lo, hi = int(zp.min()), int(zp.max())
            if lo < fmt.qmin or hi > fmt.qmax:
                bad = lo if lo < fmt.qmin else hi
                return f"zero point {bad} outside {fmt.name}'s [{fmt.qmin}, {fmt.qmax}]"
        bias = getattr(self, "bias", None)
        if bias is not None and not bool(torch.isfinite(bias).all()):
            return "bias holds NaN or Inf"
        return None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(rows, cols)`` these buffers stand for."""
        return dequantize_weight(
            self.qweight, self.scale, self.zero_point, self.spec, self.cols, dtype, self.levels
        )

    def config_entry(self) -> dict:
        """What ``from_entry`` needs to rebuild an empty module of this shape (saved in quant_config.json)."""
        return {"type": type(self).__name__, "spec": self.spec.to_dict(), "dtype": str(self.dtype)[6:]}

    def format_label(self) -> str:
        """The weight format in words: format, granularity, symmetry, e.g. "uint4 g128 asym"."""
        g = self.spec.granularity
        gran = f"g{g.size}" if isinstance(g, PerGroup) else g.kind
        return f"{self.spec.format} {gran} {'sym' if self.spec.symmetric else 'asym'}"

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.format_label()}, scale {self.spec.scale_dtype}"


@register_qmodule(nn.Linear)
class QLinear(QuantizedWeightModule):
    """``y = x @ W.T + b`` with ``W (out_features, in_features)`` stored quantized."""

    KERNEL_OP = "weight_only_linear"  # the op its backends implement (lowbit.kernels)
    ENTRY_FIELDS = QuantizedWeightModule.ENTRY_FIELDS | {
        "in_features": "dim",
        "out_features": "dim",
        "bias": "bool",
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.rows, self.cols = out_features, in_features
        self._init_weight_buffers(spec, dtype)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, m: nn.Linear, spec: QuantSpec) -> QLinear:
        return cls(m.in_features, m.out_features, spec, m.bias is not None, m.weight.dtype)

    @classmethod
    def from_entry(cls, e: dict) -> QLinear:
        spec, dtype = QuantSpec.from_dict(e["spec"]), getattr(torch, e["dtype"])
        return cls(e["in_features"], e["out_features"], spec, e["bias"], dtype)

    def config_entry(self) -> dict:
        e = super().config_entry()
        return e | {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_compiling():
            return call(self.KERNEL_OP, self, x)
        return dispatch(self.KERNEL_OP, self, x, self.backend)(x, self)


@register_qmodule(nn.Embedding)
class QEmbedding(QuantizedWeightModule):
    """Lookup table ``(num_embeddings, embedding_dim)`` stored quantized per row or per row-group."""

    ENTRY_FIELDS = QuantizedWeightModule.ENTRY_FIELDS | {
        "num_embeddings": "dim",
        "embedding_dim": "dim",
        "padding_idx": "optional_index",
    }

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spec: QuantSpec,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        g = spec.granularity
        per_row = (isinstance(g, PerChannel) and g.axis in (0, -2)) or (
            isinstance(g, PerGroup) and g.axis in (1, -1)
        )
        if not per_row and not isinstance(g, PerTensor):
            raise LowbitError(f"QEmbedding needs per-row or per-group (along the row) qparams, got {g}")
        if spec.fmt.kind == "table":
            raise LowbitError(
                f"QEmbedding takes int, codebook and float formats, not the table format {spec.format}"
            )
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.rows, self.cols = num_embeddings, embedding_dim
        self._init_weight_buffers(spec, dtype)

    @classmethod
    def from_float(cls, m: nn.Embedding, spec: QuantSpec) -> QEmbedding:
        return cls(m.num_embeddings, m.embedding_dim, spec, m.padding_idx, m.weight.dtype)

    @classmethod
    def from_entry(cls, e: dict) -> QEmbedding:
        spec, dtype = QuantSpec.from_dict(e["spec"]), getattr(torch, e["dtype"])
        return cls(e["num_embeddings"], e["embedding_dim"], spec, e.get("padding_idx"), dtype)

    def config_entry(self) -> dict:
        e = super().config_entry()
        return e | {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.spec.granularity, PerTensor):
            return nn.functional.embedding(ids, self.dequantized_weight(self.dtype))
        if is_compiling():
            return call("embedding", self, ids).to(self.dtype)
        return dispatch("embedding", self, ids)(ids, self).to(self.dtype)
