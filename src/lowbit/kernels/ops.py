"""lowbit's kernel ops as PyTorch custom ops (``torch.ops.lowbit.<op>``), so that ``torch.compile`` keeps
a quantized model in one graph and fake-tensor tracing sees each kernel as one node.

``call(op, layer, x)`` runs exactly what an eager forward runs, ``dispatch(op, layer, x,
layer.backend)(x, layer)``, inside the custom op ``lowbit::<op>``: every registered backend, bit-identical
results. Its fake implementation returns an empty output of the right shape and dtype on ``x``'s device.
Quantized modules call it only while being compiled: through the dispatcher a call costs ~2 us more than
the eager line (one row of 576 around a no-op backend: 3.9 us against 1.9 us; a 576x576 uint4 layer on
cpu_native: ~61 us against ~58 us), so eager forwards keep calling ``dispatch``. The ops have no backward
(Autograd falls through): in a compiled model no gradient flows through a quantized layer to its input,
as in eager with the native kernels (only the reference backends are differentiable).

How an op finds its layer: the layer goes in as an opaque reference object (``LayerRef``, a weak
reference; ``torch._library.opaque_object``). Dynamo reads it from the module on every call and passes it
as a graph input, guarded on its type only, so a compiled graph reaches the live layer with its backend,
``routes``, ``prepared`` caches and current buffers (replaced ones too). An integer handle into a table
would be baked into the graph as a constant, and a deep copy carries the same handle (its compiled graph
would run the original's layer); all buffers plus a spec string would lose the per-layer caches the fast
backends keep. A module makes its ``LayerRef`` when it is built and again when it is copied or unpickled
(``attach``), so that a copy never points at the original. Sizes the fake needs (output features, a
conv's output shape) are op arguments read while tracing, so Dynamo guards on them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from lowbit.core.errors import LowbitError
from lowbit.kernels.registry import dispatch

try:  # opaque objects as custom-op arguments are recent (torch 2.13 has them)
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # no custom ops: compiled forwards trace the eager path (graph breaks at kernels)
    register_opaque_type, OpaqueBase = None, object

AVAILABLE = register_opaque_type is not None
REF_ATTR = "_lowbit_ref"  # where a quantized module keeps its LayerRef


class LayerRef(OpaqueBase):
    """A quantized layer as an argument of a ``lowbit::`` op: a weak reference to it (a strong one would
    make every layer a reference cycle, its buffers kept until the garbage collector runs)."""

    def __init__(self, layer: Any) -> None:
        self.layer = weakref.ref(layer)

    def __reduce__(self):
        raise TypeError("a LayerRef is not saved or copied; its module makes a new one (attach)")


def attach(layer: Any) -> None:
    """Give ``layer`` its own ``LayerRef``: when it is built, and when it is copied or unpickled."""
    if AVAILABLE:
        setattr(layer, REF_ATTR, LayerRef(layer))


CONV_ARGS = ("kernel_size", "stride", "padding", "dilation")


def _conv2d_shape(x: torch.Tensor, layer: Any) -> list:
    """``(..., rows, h', w')``: F.conv2d's output shape for ``layer.conv`` (ints or pairs)."""
    c = layer.conv
    k, s, p, d = ((v, v) if isinstance(v, int) else v for v in (c[n] for n in CONV_ARGS))
    hw = [(x.shape[i - 2] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in (0, 1)]
    return [*x.shape[:-3], layer.rows, *hw]


def _linear_fake(x: torch.Tensor, ref: LayerRef, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _conv2d_fake(x: torch.Tensor, ref: LayerRef, shape: list[int]) -> torch.Tensor:
    return x.new_empty(shape)


def _embedding_fake(ids: torch.Tensor, ref: LayerRef, n: int) -> torch.Tensor:
    return ids.new_empty((*ids.shape, n), dtype=torch.float32)


def _rows(x: torch.Tensor, layer: Any) -> int:
    return layer.rows


def _cols(ids: torch.Tensor, layer: Any) -> int:
    return layer.cols


# op -> (its size argument, from input and layer; that argument's schema; fake; whether layer.backend forces)
OPS: dict[str, tuple[Callable, str, Callable, bool]] = {
    "weight_only_linear": (_rows, "SymInt n", _linear_fake, True),
    "dynamic_linear": (_rows, "SymInt n", _linear_fake, True),
    "static_linear": (_rows, "SymInt n", _linear_fake, True),
    "static_conv2d": (_conv2d_shape, "SymInt[] shape", _conv2d_fake, True),
    "embedding": (_cols, "SymInt n", _embedding_fake, False),
}


def _layer(ref: LayerRef) -> Any:
    layer = ref.layer()
    if layer is None:
        raise LowbitError("the quantized layer this lowbit op was traced with no longer exists")
    return layer


def _impl(op: str, takes_backend: bool) -> Callable:
    """The real implementation of ``lowbit::<op>``: the eager forward's line."""
    if takes_backend:

        def run(x: torch.Tensor, ref: LayerRef, size) -> torch.Tensor:
            layer = _layer(ref)
            return dispatch(op, layer, x, layer.backend)(x, layer)

    else:

        def run(x: torch.Tensor, ref: LayerRef, size) -> torch.Tensor:
            layer = _layer(ref)
            return dispatch(op, layer, x)(x, layer)

    return run


if AVAILABLE:
    register_opaque_type(LayerRef, typ="reference")
    _REF_TYPE = f"{LayerRef.__module__}.{LayerRef.__qualname__}"
    LIB = torch.library.Library("lowbit", "DEF")
    for _op, (_, _size_arg, _fake, _takes_backend) in OPS.items():
        LIB.define(f"{_op}(Tensor x, {_REF_TYPE} layer, {_size_arg}) -> Tensor")
        LIB.impl(_op, _impl(_op, _takes_backend), "CompositeExplicitAutograd")
        LIB.impl(_op, torch.library.fallthrough_kernel, "Autograd")  # no backward (module docstring)
        torch.library.register_fake(f"lowbit::{_op}", _fake, lib=LIB)


def call(op: str, layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``dispatch(op, layer, x, layer.backend)(x, layer)`` as one ``torch.ops.lowbit.<op>`` node: what a
    quantized module's forward runs while torch.compile traces it."""
    if op not in OPS:
        raise LowbitError(f"kernel op {op!r} has no custom op; known: {', '.join(OPS)}")
    size, _, _, takes_backend = OPS[op]
    if not AVAILABLE:
        return dispatch(op, layer, x, layer.backend if takes_backend else None)(x, layer)
    return getattr(torch.ops.lowbit, op).default(x, getattr(layer, REF_ATTR), size(x, layer))
