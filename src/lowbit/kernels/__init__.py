"""Kernel backends behind quantized-module forwards; a pure-torch reference backend always exists."""

from lowbit.kernels import cpu as _cpu  # noqa: F401  (registers the torch-kernel CPU backends)
from lowbit.kernels import cpu_native as _cpu_native  # noqa: F401  (registers lowbit's own CPU kernels)
from lowbit.kernels import integer as _integer  # noqa: F401  (registers the integer-only static W8A8 ops)
from lowbit.kernels import reference as _reference  # noqa: F401  (registers the reference backends)
from lowbit.kernels.registry import Backend, backends, dispatch, prepared, register_backend, select

__all__ = ["Backend", "backends", "dispatch", "prepared", "register_backend", "select"]
