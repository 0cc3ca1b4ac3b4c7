"""fp32 cache of dequantized GGUF models: ``<cache root>/<key>/`` holds a Hugging Face folder.

A cache entry is built in a hidden temp folder beside it and renamed into place, so a killed build
never leaves a half entry (only a ``.<key>.tmp-*`` folder, removed by a later build once it is an hour
old). ``lowbit_cache.json`` records the source GGUF (name, size, content hash) and every file's size; an
entry whose record does not match, or whose safetensors header/size is inconsistent, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lowbit.core.errors import CheckpointError
from lowbit.core.fsio import atomic_dir, cache_root  # noqa: F401  (re-exported)
from lowbit.models.checks import check_hf_folder

MANIFEST = "lowbit_cache.json"
CACHE_VERSION = 1
STALE_TMP_SECONDS = 3600.0


HASH_SPAN = 1 << 20  # bytes hashed at each end of a GGUF file


def source_stamp(gguf: Path) -> dict:
    """What identifies a GGUF file's content cheaply: name, size (bytes), sha256 of its first and last MiB.

    Content, not path or mtime: the same wheel installed in two virtualenvs shares one cache entry.
    """
    size = gguf.stat().st_size
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        h.update(f.read(HASH_SPAN))
        f.seek(max(size - HASH_SPAN, 0))
        h.update(f.read(HASH_SPAN))
    return {"name": gguf.name, "size": size, "sha256_head_tail": h.hexdigest()}


def gguf_key(gguf: Path) -> str:
    """Cache folder name of a user's GGUF file: ``<stem>-<12 hex of its source stamp>``."""
    digest = hashlib.sha1(json.dumps(source_stamp(gguf), sort_keys=True).encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def _manifest(folder: Path, source: dict) -> dict:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return {"version": CACHE_VERSION, "source": source, "files": dict(sorted(files.items()))}


def cache_problem(entry: Path, source: dict) -> str | None:
    """Why cache ``entry`` cannot be used for ``source`` (one line), or None if it is sound."""
    path = entry / MANIFEST
    if not path.is_file():
        return f"{path} is missing"
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path} is corrupted ({e})"
    if not isinstance(record, dict) or record.get("version") != CACHE_VERSION:
        return f"{path} has an unknown cache version"
    if record.get("source") != source:
        return f"the source GGUF changed since {entry} was built"
    for name, size in dict(record.get("files") or {}).items():
        f = entry / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{f} is missing or has the wrong size"
    try:
        check_hf_folder(entry)
    except CheckpointError as e:
        return str(e)
    return None


def _remove_stale_tmp(entry: Path) -> None:
    """Delete temp folders that killed builds of ``entry`` left behind (older than an hour)."""
    now = time.time()
    for p in entry.parent.glob(f".{entry.name}.tmp-*"):
        if p.is_dir() and now - p.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def build_entry(entry: Path, source: dict, fill: Callable[[Path], None]) -> None:
    """Build cache ``entry`` atomically: ``fill(tmp)`` writes a Hugging Face folder into ``tmp``.

    An existing (unusable) entry is replaced; a build that fails leaves it as it was.
    """
    if entry.parent.is_dir():
        _remove_stale_tmp(entry)
    with atomic_dir(entry, overwrite=True) as tmp:
        fill(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp, source), indent=1))
