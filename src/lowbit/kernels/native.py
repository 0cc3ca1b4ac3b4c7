"""lowbit's own CPU kernels (``csrc/lowbit_cpu.c``): compiled on first use, cached, loaded with ctypes.

The library is built with the system C compiler (``$CC``, else ``cc``) as
``cc -O3 -march=native -fopenmp -shared`` into ``<cache root>/kernels/lowbit_cpu-<key>.so``, where the key
hashes the source, the flags, the compiler's version and this CPU's model and feature flags, so a changed
source or another machine never loads a stale build. The build goes to a temp file renamed into place.
Nothing happens at import: the first quantized forward on the CPU builds (about a second) or loads it.

OpenMP: torch's wheel ships ``libgomp.so.1`` under that soname and loads it first, so these kernels and
torch's own ops share one thread pool; the kernels use ``torch.get_num_threads()`` threads.

Set ``LOWBIT_NATIVE=0`` to turn the kernels off (the reference backend then runs, with a warning).

Variants (``FLAGS``): ``native`` is what runs; ``nobf16`` (native without AVX512-BF16) and ``generic``
(x86-64-v2, the portable C paths) exist so the tests cover every code path on one machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from lowbit.core.fsio import cache_root

SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.c"
ABI_VERSION = 4
FLAGS = {
    "native": ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"],
    "nobf16": ["-O3", "-march=native", "-mno-avx512bf16", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"],
    "generic": ["-O3", "-march=x86-64-v2", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"],
}
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "lb_abi_version": ([], _int),
    "lb_has_avx512": ([], _int),
    "lb_has_bf16": ([], _int),
    "lb_wo_gemm": (
        [_ptr, _i64, _i64, _ptr, _i64, _i64, _int, _int, _i64, _ptr, _int, _ptr, _int, _ptr, _ptr, _int], _int
    ),
    "lb_dequant_rows": (
        [_ptr, _i64, _i64, _i64, _i64, _int, _int, _i64, _ptr, _int, _ptr, _int, _ptr, _int], None
    ),
    "lb_w8a8_gemm": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int], _int),
}  # fmt: skip


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def _cpu_fingerprint() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (set $CC, or install gcc)")
    return cc


def build(variant: str = "native", out_dir: Path | None = None) -> Path:
    """Path of the compiled library for ``variant`` (a key of ``FLAGS``), building it if needed."""
    cc, flags = _compiler(), FLAGS[variant]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"cannot run the C compiler {cc}: {e}") from e
    src = SOURCE.read_bytes()
    parts = [src, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out_dir = out_dir or cache_root() / "kernels"
    target = out_dir / f"lowbit_cpu-{variant}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lowbit_cpu-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise NativeUnavailable(f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.lb_abi_version() != ABI_VERSION:
        raise NativeUnavailable(f"{path} has ABI {lib.lb_abi_version()}, expected {ABI_VERSION}")
    return lib


@cache
def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) where they cannot be built here."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    try:
        return load(build(variant))
    except (NativeUnavailable, OSError) as e:
        warnings.warn(
            f"lowbit: native CPU kernels unavailable ({e}); quantized layers fall back to "
            "dequantize + matmul, which is slower than float",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def available() -> bool:
    return library() is not None


def threads() -> int:
    return torch.get_num_threads()
