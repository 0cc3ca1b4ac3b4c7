"""``torch.ops.lowbit_native.linear``: lowbit's C GEMV kernels as a PyTorch operator written in C++.

The ``lowbit::`` custom ops (``lowbit.kernels.ops``) run a Python implementation, so a compiled graph pays
for Python frames on every kernel call (and, on CPython 3.11, for a frame-stack chunk mapped and unmapped
per call where the calls land on a chunk boundary: docs/speed.md). The fast decode path
(``lowbit.decode``) calls this C++ operator instead: no Python between the compiled graph and the kernel.

``torch_csrc/lowbit_ops.cpp`` is compiled on first use by ``torch.utils.cpp_extension`` (about 7 s) into
``<cache root>/kernels/torch-<key>/`` (private folder, as ``lowbit.kernels.native``'s; the key hashes the
source and torch's version), and loaded as a library of ops. It holds no kernels of its own: it receives
the addresses of ``lb_wo_gemm``/``lb_wo_gemm_a8`` from the library ``lowbit.kernels.native`` checked and
loaded. ``available()`` is False (with one warning) where it cannot be built; callers then keep the
Python route.
"""

from __future__ import annotations

import ctypes
import hashlib
import warnings
from functools import cache
from pathlib import Path

import torch

from lowbit.core.fsio import cache_root
from lowbit.kernels import cpu_native, native

SOURCE = Path(__file__).parent / "torch_csrc" / "lowbit_ops.cpp"


def _fake(x, qweight, scale, zero_point, lut, bias, code, offset, group, scale_kind, zp_kind, stride, a8):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _build() -> None:
    from torch.utils import cpp_extension

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    folder = cache_root() / "kernels" / f"torch-{key}"
    native._private_folder(folder.parent)
    native._private_folder(folder)
    cpp_extension.load(
        name=f"lowbit_ops_{key}",
        sources=[str(SOURCE)],
        extra_cflags=["-O2"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )


@cache
def available() -> bool:
    """Whether ``torch.ops.lowbit_native.linear`` is built, loaded and wired to the C kernels."""
    lib = native.library()
    if lib is None:
        return False
    try:
        _build()
    except Exception as e:  # no C++ compiler, no ninja, headers missing: the Python route stays
        warnings.warn(
            f"lowbit: C++ kernel operator unavailable ({e}); using the Python route",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    addr = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in ("lb_wo_gemm", "lb_wo_gemm_a8")]
    torch.ops.lowbit_native.set_kernels(*addr)
    torch.library.register_fake("lowbit_native::linear", _fake)
    return True


def static_args(layer) -> dict:
    """The constant arguments of ``lowbit_native.linear`` for a layer ``cpu_native`` can run: its kinds
    (``cpu_native.kinds``), level table (or None) and the table's row stride."""
    lut, stride = cpu_native._lut(layer)
    return cpu_native.kinds(layer) | {"lut": lut, "lut_stride": stride}
