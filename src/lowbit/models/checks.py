"""Cheap integrity checks of model files (header + size only, no tensor data is read)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lowbit.core.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
GGUF_MAGIC = b"GGUF"


def _data_end(path: Path, header: object) -> int:
    """Largest ``data_offsets`` end in a parsed safetensors header (bytes after the header)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(
                f"{path}: corrupted safetensors header (tensor {name!r} has no data_offsets)"
            )
        end = max(end, offsets[1])
    return end


def check_safetensors(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming ``path`` if it is missing, truncated or has a corrupted header.

    A safetensors file is ``u64 header length (little endian) | JSON header | tensor data``; its size
    must be exactly ``8 + header length + largest data end offset``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header alone is {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from e
    expected = 8 + n + _data_end(path, header)
    if size != expected:
        what = "truncated" if size < expected else "corrupted"
        raise CheckpointError(
            f"{path}: {what} safetensors file: {size} bytes on disk, header says {expected}"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (the shards its index names, or ``*.safetensors``)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupted safetensors index ({e!r})") from e
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def check_hf_folder(folder: str | Path) -> None:
    """Raise ``CheckpointError`` naming the file if a Hugging Face folder lacks config or sound weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights (other weight formats are not supported)")
    for path in files:
        check_safetensors(path)


def check_gguf(path: Path) -> None:
    """Raise ``CheckpointError`` if ``path`` does not start with the GGUF magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
