"""Validation of a checkpoint's ``quant_config.json`` before anything is built from it.

Every field is checked for type and bounds (``extra="forbid"`` style: unknown keys are errors) so that a
malformed, truncated or hostile config is one ``CheckpointError`` naming the file and the field, never a
traceback and never an allocation sized by the file. Module entries are checked against the
``ENTRY_FIELDS`` their class declares, with these kinds:

| kind             | accepted value                                                         |
|------------------|------------------------------------------------------------------------|
| `dim`            | int (not bool) in ``[0, MAX_DIM]``                                     |
| `bool`           | true / false                                                           |
| `dtype`          | a float dtype name: float32, float16, bfloat16, float64                |
| `spec`           | a ``QuantSpec.to_dict()``: format, symmetric, granularity, scale_dtype, clip_ratio |
| `optional_index` | null or an int in ``[-MAX_DIM, MAX_DIM]``                              |
| `conv`           | in/out_channels, kernel_size, stride, padding, dilation, groups        |

Checksums (format version 2): ``tensor_sha256`` maps every stored tensor to the sha256 of its bytes in
``model.safetensors``; ``config_sha256`` is the sha256 of the rest of the config as canonical JSON
(``canonical_json``), so a changed field or a changed digest is detected too.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from pathlib import Path

from lowbit.core.errors import CheckpointError, FormatVersionError, LowbitError
from lowbit.core.spec import QuantSpec
from lowbit.nn.modules import QMODULES

MAX_DIM = 2**31 - 1
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INPUT_DTYPES = (*FLOAT_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
OPTIONAL_FIELDS = ("requantize_output", "padding_idx")
TOP_FIELDS = {
    "format", "format_version", "config", "modules", "aliases", "identity", "source", "inputs",
    "tensor_sha256", "config_sha256", "basis",
}  # fmt: skip
CONV_FIELDS = {"in_channels": 1, "out_channels": 1, "kernel_size": 1, "stride": 1, "padding": 0,
               "dilation": 1, "groups": 1}  # fmt: skip
SPEC_FIELDS = {"format", "symmetric", "granularity", "scale_dtype", "clip_ratio"}
HEX64 = set("0123456789abcdef")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(v: object, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi


def _spec(v: object) -> QuantSpec:
    if not isinstance(v, dict) or set(v) - SPEC_FIELDS or "format" not in v:
        raise LowbitError(f"expected a QuantSpec object with keys {sorted(SPEC_FIELDS)}")
    g = v.get("granularity", {"kind": "per_tensor"})
    if not isinstance(g, dict) or not isinstance(g.get("kind"), str):
        raise LowbitError("granularity must be an object with a 'kind'")
    if "size" in g and not _int_in(g["size"], 1, MAX_DIM):
        raise LowbitError(f"group size must be an int in [1, {MAX_DIM}], got {g['size']!r}")
    if "axis" in g and not _int_in(g["axis"], -8, 7):
        raise LowbitError(f"axis must be an int in [-8, 7], got {g['axis']!r}")
    if not all(isinstance(v.get(k, ""), str) for k in ("format", "scale_dtype")):
        raise LowbitError("format and scale_dtype must be strings")
    if not isinstance(v.get("symmetric", True), bool):
        raise LowbitError(f"symmetric must be true or false, got {v['symmetric']!r}")
    clip = v.get("clip_ratio", 1.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip):
        raise LowbitError(f"clip_ratio must be a finite number, got {clip!r}")
    return QuantSpec.from_dict(v)


def _pair(v: object, lo: int) -> bool:
    if isinstance(v, list):
        return len(v) == 2 and all(_int_in(x, lo, 1 << 16) for x in v)
    return _int_in(v, lo, 1 << 16)


def _conv(v: object) -> None:
    if not isinstance(v, dict) or set(v) != set(CONV_FIELDS):
        raise LowbitError(f"expected an object with exactly the keys {sorted(CONV_FIELDS)}")
    for k in ("in_channels", "out_channels", "groups"):
        if not _int_in(v[k], 1, MAX_DIM):
            raise LowbitError(f"{k} must be an int in [1, {MAX_DIM}], got {v[k]!r}")
    for k in ("kernel_size", "stride", "padding", "dilation"):
        if not _pair(v[k], CONV_FIELDS[k]):
            raise LowbitError(f"{k} must be an int >= {CONV_FIELDS[k]} or a pair of them, got {v[k]!r}")


_PREDICATES = {
    "dim": lambda v: _int_in(v, 0, MAX_DIM),
    "bool": lambda v: isinstance(v, bool),
    "dtype": lambda v: isinstance(v, str) and v in FLOAT_DTYPES,
    "optional_index": lambda v: v is None or _int_in(v, -MAX_DIM, MAX_DIM),
}
_CHECKS = {"spec": _spec, "conv": _conv}  # raise LowbitError with their own message


def check_field(kind: str, v: object) -> None:
    """Raise ``LowbitError`` unless ``v`` is a valid value of ``kind`` (table in the module docstring)."""
    if kind in _CHECKS:
        _CHECKS[kind](v)
    elif not _PREDICATES[kind](v):
        raise LowbitError(f"expected {kind}, got {json.dumps(v)[:60]}")


def check_entry(fqn: str, entry: object, where: Path) -> type:
    """The module class of ``modules[fqn]`` after checking every field of ``entry``; ``CheckpointError``."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: module {fqn}: entry must be an object, got {json.dumps(entry)[:40]}")
    cls = QMODULES.get(entry.get("type")) if isinstance(entry.get("type"), str) else None
    if cls is None:
        raise CheckpointError(f"{where}: module {fqn}: unknown type {str(entry.get('type'))[:60]!r}")
    fields = cls.ENTRY_FIELDS
    unknown = set(entry) - set(fields) - {"type"}
    missing = set(fields) - set(entry) - set(OPTIONAL_FIELDS)
    if unknown or missing:
        raise CheckpointError(
            f"{where}: module {fqn}: unknown fields {sorted(unknown)[:5]}, missing {sorted(missing)}"
        )
    for key, kind in fields.items():
        if key in entry:
            try:
                check_field(kind, entry[key])
            except LowbitError as e:
                raise CheckpointError(f"{where}: module {fqn}: {key}: {e}") from None
    return cls


def _check_version(v: object, newest: int, where: Path) -> int:
    if not _is_int(v):
        raise CheckpointError(f"{where}: format_version must be an integer, got {json.dumps(v)[:40]}")
    if v < 1:
        raise CheckpointError(f"{where}: format_version must be >= 1, got {v}")
    if v > newest:
        raise FormatVersionError(
            f"{where}: format version {v} is newer than this lowbit reads ({newest}); upgrade lowbit"
        )
    return v


def _names(v: object, what: str, where: Path) -> None:
    if not all(isinstance(s, str) and s and len(s) < 4096 for s in v):
        raise CheckpointError(f"{where}: {what} must hold non-empty module or tensor names")


def _check_inputs(v: object, where: Path) -> None:
    """``inputs``: null or {name: {"shape": [dims], "dtype": name}} (an export example's shapes)."""
    ok = v is None or isinstance(v, dict)
    for s in (v or {}).values() if ok else ():
        ok = ok and isinstance(s, dict) and set(s) == {"shape", "dtype"} and s["dtype"] in INPUT_DTYPES
        shape = s.get("shape") if isinstance(s, dict) else None
        ok = ok and isinstance(shape, list) and len(shape) <= 8 and all(_int_in(d, 0, 1 << 20) for d in shape)
        ok = ok and math.prod(shape[1:]) <= 1 << 28
    if not ok:
        raise CheckpointError(f"{where}: inputs must be null or {{name: {{shape, dtype}}}} of bounded size")


def check_meta(meta: object, where: Path, newest: int) -> dict:
    """``meta`` (parsed JSON) after checking its top level, every module entry and the field types;
    ``where`` names the file in errors, ``newest`` is the newest format version this lowbit reads."""
    if not isinstance(meta, dict) or meta.get("format") != "lowbit":
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{where}: not a lowbit quant config (format={str(got)[:40]!r})")
    unknown = set(meta) - TOP_FIELDS
    if unknown:
        raise CheckpointError(f"{where}: unknown fields {sorted(unknown)[:5]}")
    version = _check_version(meta.get("format_version"), newest, where)
    kinds = {"modules": dict, "aliases": dict, "identity": list, "config": (dict, type(None))}
    for key, kind in kinds.items():
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{where}: {key} has the wrong type ({type(meta[key]).__name__})")
    if "modules" not in meta:
        raise CheckpointError(f"{where}: no modules")
    _names(meta["modules"], "modules", where)
    for fqn, entry in meta["modules"].items():
        check_entry(fqn, entry, where)
    aliases = meta.get("aliases", {})
    _names([*aliases, *aliases.values()], "aliases", where)
    _names(meta.get("identity", []), "identity", where)
    if not isinstance(meta.get("source"), (str, type(None))):
        raise CheckpointError(f"{where}: source must be a model name or null")
    _check_inputs(meta.get("inputs"), where)
    basis = meta.get("basis")
    if basis is not None:
        if not isinstance(basis, list):
            raise CheckpointError(f"{where}: basis must be a list of module names or null")
        _names(basis, "basis", where)
    _check_digests(meta, version, where)
    return meta


def _check_digests(meta: dict, version: int, where: Path) -> None:
    digests, own = meta.get("tensor_sha256"), meta.get("config_sha256")
    if version < 2 and digests is None and own is None:
        return
    ok = isinstance(digests, dict) and all(isinstance(k, str) and _hex64(d) for k, d in digests.items())
    if not (ok and _hex64(own)):
        raise CheckpointError(f"{where}: missing or malformed checksums (tensor_sha256, config_sha256)")


def _hex64(v: object) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= HEX64


def canonical_json(meta: dict) -> bytes:
    """The bytes ``config_sha256`` hashes: ``meta`` without that key, sorted keys, no spaces."""
    rest = {k: v for k, v in meta.items() if k != "config_sha256"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def config_digest(meta: dict) -> str:
    return hashlib.sha256(canonical_json(meta)).hexdigest()


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(parsed JSON header, byte offset where the tensor data starts) of safetensors file ``path``."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes in safetensors file ``path`` (read in place through mmap).

    ``path`` must have passed a safetensors parse (``safe_open``); offsets outside the file raise
    ``CheckpointError``."""
    header, base = safetensors_header(path)
    header.pop("__metadata__", None)
    out = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for name, info in header.items():
                start, end = info["data_offsets"]
                if not 0 <= start <= end <= len(mm) - base:
                    raise CheckpointError(f"{path}: tensor {name} lies outside the file")
                out[name] = hashlib.sha256(view[base + start : base + end]).hexdigest()
        finally:
            view.release()
    return out
