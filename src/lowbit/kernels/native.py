"""lowbit's own CPU kernels (``csrc/lowbit_cpu.c``, which includes ``csrc/lowbit_cpu_a8.c``): compiled on
first use, cached, loaded with ctypes.

The library is built with the system C compiler (``$CC``, else ``cc``) as
``cc -O3 -march=native -fopenmp -shared`` into ``<cache root>/kernels/lowbit_cpu-<variant>-<key>.so``, where
the key hashes the sources, the flags, the compiler's version and this CPU's model and feature flags, so a
changed source or another machine never loads a stale build. The build goes to a temp file renamed into
place; its sha256 goes to ``<library>.sha256`` beside it.

Trust: the kernels folder must belong to this user and is kept at mode 0700 (a folder owned by someone
else is refused: the reference backend runs, with a warning). Before every load the library must be a
regular file of ours, not group/other-writable, whose bytes hash to the recorded sha256; anything else
(a file planted under the expected name, a symlink, a lost or different digest) is rebuilt, not loaded.
On Linux the bytes hashed are the bytes mapped (dlopen of ``/proc/self/fd/N``).
Nothing happens at import: the first quantized forward on the CPU builds (about a second) or loads it.

OpenMP: torch's wheel ships ``libgomp.so.1`` under that soname and loads it first, so these kernels and
torch's own ops share one thread pool; the kernels use ``torch.get_num_threads()`` threads.

Set ``LOWBIT_NATIVE=0`` to turn the kernels off (the reference backend then runs, with a warning).

Variants (``FLAGS``): ``native`` is what runs; ``nobf16`` (native without AVX512-BF16, AVX512-VBMI and
GFNI, as on a Cascade Lake: the int8-activation kernel's other unpacking paths) and ``generic`` (x86-64-v2,
the portable C paths) exist so the tests cover every code path on one machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_write_text, cache_root

SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.c"  # compiled; it includes the other csrc/*.c
ABI_VERSION = 8
_COMMON = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
FLAGS = {
    "native": ["-march=native", *_COMMON],
    "nobf16": ["-march=native", "-mno-avx512bf16", "-mno-avx512vbmi", "-mno-gfni", *_COMMON],
    "generic": ["-march=x86-64-v2", *_COMMON],
}
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "lb_abi_version": ([], _int),
    "lb_has_avx512": ([], _int),
    "lb_has_vnni": ([], _int),
    "lb_wo_gemm": (
        [_ptr, _i64, _i64, _ptr, _i64, _i64, _int, _int, _i64, _ptr, _int, _ptr, _int, _ptr, _i64, _ptr, _ptr,
         _int], _int
    ),
    "lb_dequant_rows": (
        [_ptr, _i64, _i64, _i64, _i64, _int, _int, _i64, _ptr, _int, _ptr, _int, _ptr, _i64, _ptr, _int], None
    ),
    "lb_w8a8_gemm": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int], _int),
    "lb_wo_gemm_a8": (
        [_ptr, _i64, _i64, _ptr, _i64, _i64, _int, _int, _i64, _ptr, _int, _ptr, _int, _ptr, _ptr, _int], _int
    ),
    "lb_decode_sizes": ([_ptr], _int),
    "lb_decode_tokens": ([_ptr, _i64, _i64, _ptr, _ptr, _int], _int),
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


def _build_key(cc: str, flags: list[str]) -> str:
    """16 hex of sha256 over the sources, the flags, the compiler's version and this CPU's fingerprint."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"cannot run the C compiler {cc}: {e}") from e
    sources = [p.read_bytes() for p in sorted(SOURCE.parent.glob("*.c"))]
    parts = [*sources, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _sidecar(lib: Path) -> Path:
    """Where the sha256 of library ``lib`` is recorded at build time: ``<lib name>.sha256`` beside it."""
    return lib.with_name(lib.name + ".sha256")


def _private_folder(folder: Path) -> None:
    """Make ``folder`` a folder of this user's that no one else can enter (mode 0700).

    Created with mode 0700; one of ours with another mode is chmod-ed to 0700. One owned by another
    user raises ``NativeUnavailable`` (``library`` then warns and the reference backend runs): that user
    could swap the library under us, and refusing is simpler and safer than a per-process temp build.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise NativeUnavailable(f"{folder} is not a folder")
    if st.st_uid != os.getuid():
        raise NativeUnavailable(
            f"{folder} is owned by another user (uid {st.st_uid}); not building or loading kernels "
            "there (set LOWBIT_CACHE to a folder of your own)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _sha256_fd(fd: int) -> str:
    """sha256 (hex) of everything readable from descriptor ``fd``, read from its start."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _open_checked(path: Path) -> tuple[int, str]:
    """(open descriptor, sha256) of library ``path``, or ``NativeUnavailable`` saying what is wrong.

    ``path`` is opened without following a symlink; the open file must be a regular file owned by this
    user, not group/other-writable, and its bytes (hashed through that same descriptor) must match the
    digest recorded beside it at build time. ``FileNotFoundError`` if ``path`` does not exist.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NativeUnavailable(f"{path}: cannot open it ({e.strerror}; a symlink?)") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise NativeUnavailable(f"{path} is not a regular file of yours, or is group/other-writable")
        digest = _sha256_fd(fd)
        try:
            recorded = _sidecar(path).read_text().strip()
        except OSError as e:
            raise NativeUnavailable(f"{path}: no recorded sha256 ({e.strerror})") from e
        if digest != recorded:
            raise NativeUnavailable(f"{path}: sha256 {digest[:16]} differs from the recorded {recorded[:16]}")
    except BaseException:
        os.close(fd)
        raise
    return fd, digest


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Compile the source into a temp file beside ``target``, record its sha256 in the sidecar
    (written atomically), then rename the library into place."""
    fd, tmp = tempfile.mkstemp(prefix=".lowbit_cpu-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise NativeUnavailable(f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o700)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            digest = _sha256_fd(fd)
        finally:
            os.close(fd)
        atomic_write_text(_sidecar(target), digest + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(variant: str = "native", out_dir: Path | None = None) -> Path:
    """Path of the compiled library for ``variant`` (a key of ``FLAGS``), built unless a sound one exists.

    ``out_dir`` (default ``<cache root>/kernels``) is made private first (``_private_folder``). An
    existing library is reused only if ``_open_checked`` accepts it; any other one (planted or corrupted
    file, symlink, missing or different recorded sha256, wrong owner or mode) is rebuilt, with a warning.
    """
    cc, flags = _compiler(), FLAGS[variant]
    out_dir = out_dir or cache_root() / "kernels"
    _private_folder(out_dir)
    target = out_dir / f"lowbit_cpu-{variant}-{_build_key(cc, flags)}.so"
    try:
        os.close(_open_checked(target)[0])
        return target
    except FileNotFoundError:
        pass
    except NativeUnavailable as e:
        warnings.warn(f"lowbit: rebuilding the native CPU kernels: {e}", RuntimeWarning, stacklevel=2)
    _compile(cc, flags, target)
    return target


_PINNED: list[int] = []  # descriptors behind loaded libraries, never closed (see ``load``)


def load(path: Path) -> ctypes.CDLL:
    """Open a built library that ``_open_checked`` accepts and declare its functions' signatures.

    On Linux dlopen maps ``/proc/self/fd/N``, the descriptor that was checked and hashed, so a file
    swapped in at ``path`` after the check is never loaded; elsewhere it opens ``path``. The descriptor
    stays open: glibc matches loaded libraries by name, so a reused ``N`` would return the old library.
    The library carries ``lowbit_path`` and ``lowbit_sha256`` (of the bytes checked).
    """
    fd, digest = _open_checked(path)
    by_fd = f"/proc/self/fd/{fd}"
    if not os.path.exists(by_fd):
        os.close(fd)
        by_fd = str(path)
    else:
        _PINNED.append(fd)
    lib = ctypes.CDLL(by_fd)
    lib.lowbit_path, lib.lowbit_sha256 = str(path), digest
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.lb_abi_version() != ABI_VERSION:
        raise NativeUnavailable(f"{path} has ABI {lib.lb_abi_version()}, expected {ABI_VERSION}")
    return lib


@cache
def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) where they cannot be built or loaded safely here."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    try:
        return load(build(variant))
    except (NativeUnavailable, OSError, LowbitError) as e:
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
