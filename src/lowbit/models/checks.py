"""Cheap checks of model files before transformers opens them (header + size only, no tensor data is read).

A Hugging Face folder is loaded from safetensors only, with no code of its own, from files inside it
(symlinks followed; a hub cache snapshot may link into its ``blobs``), and not if it is a lowbit
checkpoint. Messages name the file but quote none of its bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lowbit.core.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # bytes: a larger safetensors header length field is not believed
LOWBIT_FORMAT = "lowbit"  # safetensors ``__metadata__["format"]`` of a lowbit checkpoint's weights
QUANT_CONFIG = "quant_config.json"  # what a lowbit checkpoint cannot be loaded without
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


def check_safetensors(path: str | Path) -> dict:
    """Raise ``CheckpointError`` naming ``path`` if it is missing, truncated or has a corrupted header;
    return the header's ``__metadata__`` (string -> string; empty if none).

    A safetensors file is ``u64 header length (little endian) | JSON header | tensor data``; its size
    must be exactly ``8 + header length + largest data end offset``. A header length beyond the file or
    over ``MAX_HEADER`` bytes means "not a safetensors file": the message quotes no byte of the file.
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
        if 8 + n > size or n > MAX_HEADER:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated (header length field is implausible)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupted safetensors header (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted safetensors header (not JSON: {e.msg})") from None
    expected = 8 + n + _data_end(path, header)
    if size != expected:
        what = "truncated" if size < expected else "corrupted"
        raise CheckpointError(
            f"{path}: {what} safetensors file: {size} bytes on disk, header says {expected}"
        )
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a model folder's weight files may resolve to: the folder itself, and for a Hugging Face hub
    cache snapshot (``.../snapshots/<revision>``, whose files link to ``../../blobs/``) that blob folder."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(folder: Path, name: str, named_by: Path | None = None, what: str = "shard") -> Path:
    """``folder / name`` once ``name`` is a relative path without ``..`` that (symlinks followed) stays
    inside ``folder`` (see ``_allowed_roots``); else ``CheckpointError`` naming the file ``named_by``
    that lists ``name`` (``what`` says as what), or the file itself."""
    rel = Path(name)
    bad = not name or "\0" in name or rel.is_absolute() or ".." in rel.parts
    path = folder / rel
    if not bad:
        real = path.resolve()
        bad = not any(real.is_relative_to(root) for root in _allowed_roots(folder))
    if bad and named_by is not None:
        raise CheckpointError(f"{named_by}: {what} {name!r} is not a file inside {folder}")
    if bad:
        raise CheckpointError(f"{path} is not a file inside {folder} (it links out of it)")
    return path


def _index_shards(index: Path) -> list[Path]:
    """The shard files that ``index`` (a ``model.safetensors.index.json``) maps tensors to, each inside
    the index's folder (``_inside``); ``CheckpointError`` naming the index if it is malformed."""
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{index}: corrupted safetensors index (not JSON)") from None
    data = data if isinstance(data, dict) else {}
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: corrupted safetensors index (needs a weight_map of tensor name -> shard file name)"
        )
    if not isinstance(data.get("metadata"), dict):
        raise CheckpointError(f"{index}: corrupted safetensors index (no metadata object)")
    return [_inside(index.parent, name, index) for name in sorted(set(weight_map.values()))]


def weight_files(folder: Path, named: object = None) -> list[Path]:
    """Every safetensors file transformers may load from a Hugging Face folder, each inside the folder
    (``_inside``): the file or index ``named`` by config.json's ``transformers_weights`` if set, else
    ``model.safetensors`` and the shards of ``model.safetensors.index.json`` (whichever exist)."""
    if named is not None:
        config = folder / "config.json"
        if not isinstance(named, str) or not named.endswith((".safetensors", ".safetensors.index.json")):
            raise CheckpointError(f"{config}: transformers_weights {named!r} is not a safetensors file")
        path = _inside(folder, named, config, "transformers_weights")
        return _index_shards(path) if named.endswith(".json") else [path]
    files = []
    for name in (SAFETENSORS, SAFETENSORS_INDEX):
        path = folder / name
        if path.exists() or path.is_symlink():
            _inside(folder, name)
            files += _index_shards(path) if name == SAFETENSORS_INDEX else [path]
    return sorted(set(files))


def read_hf_config(folder: Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face folder; ``CheckpointError`` if it is missing, not a
    JSON object, asks for code from the folder (``auto_map``) or names a ``model_type`` that is not built
    into transformers (lowbit never runs a model folder's own code)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if "auto_map" in cfg:
        raise CheckpointError(
            f"{path}: asks for the model's own Python code (auto_map); lowbit never runs code from a "
            "model folder (remove auto_map to load it with the built-in class of its model_type)"
        )
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not built into transformers; lowbit never runs code "
            "from a model folder"
        )
    return cfg


def check_hf_folder(folder: str | Path) -> None:
    """Raise ``CheckpointError`` naming the file unless ``folder`` is a Hugging Face model folder lowbit
    loads as a float model: a sound ``config.json`` (``read_hf_config``), safetensors weights only inside
    the folder (``weight_files``; a ``pytorch_model.bin`` is never read) with sound headers, and not a lowbit
    checkpoint (safetensors metadata ``format: lowbit``), which needs its ``quant_config.json``.
    """
    folder = Path(folder)
    files = weight_files(folder, read_hf_config(folder).get("transformers_weights"))
    if not files:
        raise CheckpointError(
            f"{folder}: no *.safetensors weights ({SAFETENSORS} or {SAFETENSORS_INDEX}; other weight "
            "formats such as pytorch_model.bin are never loaded)"
        )
    formats = {check_safetensors(path).get("format") for path in files}
    if LOWBIT_FORMAT in formats:
        if (folder / QUANT_CONFIG).is_file():
            raise CheckpointError(f"{folder}: a lowbit checkpoint; load it with lowbit.load({str(folder)!r})")
        raise CheckpointError(
            f"{folder}: looks like a lowbit checkpoint but {QUANT_CONFIG} is missing; it cannot be "
            "loaded as a float model"
        )


def check_gguf(path: Path) -> None:
    """Raise ``CheckpointError`` if ``path`` does not start with the GGUF magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
