"""``save``/``load``: safetensors with the stored codes plus a versioned ``quant_config.json``.

Layout of a saved folder (see docs/ARCHITECTURE.md):

    quant_config.json   format, format_version, config, modules {fqn: entry}, aliases {name: canonical},
                        identity [fqns replaced by nn.Identity: folded BatchNorms, fused activations],
                        source (bundled model name, to rebuild a skeleton), inputs (example shapes),
                        basis [fqns whose float weights were rescaled, lowbit.transforms.basis; null:
                        not recorded],
                        tensor_sha256 {tensor: sha256}, config_sha256 (of the rest, canonical JSON)
    model.safetensors   the model's state dict; tensors that share storage are stored once (aliases);
                        the basis rescalings as ``lowbit.basis.<fqn>/rows|inputs`` (float64 vectors)
    config.json, tokenizer files   for Hugging Face models, so ``load`` can rebuild the skeleton

The format is named inside the folder, never in file names. Format version 2 added the checksums;
version 1 folders still load (unverified, with a warning).

``load`` trusts nothing it reads: ``quant_config.json`` is checked field by field before anything is
built (``lowbit.export.validate``); quantized modules are built on the meta device and their shapes
compared with the safetensors header before any tensor data is read; with ``verify`` (the default) the
config's and every tensor's sha256 must match; every loaded scale must be finite and positive, every
zero point in its format's range, every float parameter finite, and no tensor may be left unloaded.
Each failure is a ``CheckpointError`` naming the file and the tensor or field.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core import fsio
from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.fsio import atomic_dir
from lowbit.export.peers import is_peer, load_peer
from lowbit.export.validate import check_meta, config_digest, tensor_digests
from lowbit.nn.modules import QuantizedModule
from lowbit.transforms.basis import PREFIX as BASIS_PREFIX
from lowbit.transforms.basis import from_tensors as basis_from_tensors
from lowbit.transforms.basis import to_tensors as basis_tensors

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 2
MAX_CONFIG_BYTES = 256 << 20
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"


def dedupe_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor; return (tensors, alias -> canonical name)."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a lowbit checkpoint (``quant_config.json``): what ``overwrite`` replaces."""
    return (Path(folder) / QUANT_CONFIG).is_file()


def check_target(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """``out_dir`` as a Path if a checkpoint may be written there, else ``LowbitError``: an existing
    folder is replaced only with ``overwrite`` and only when it is a lowbit checkpoint or empty (the
    check ``save`` and ``atomic_dir`` make, for callers that want it before long work)."""
    return fsio.check_target(out_dir, overwrite, replaceable=is_checkpoint)


def write_quant_config(folder: Path, meta: dict, digests: dict[str, str] | None = None) -> None:
    """Write ``meta`` as ``folder/quant_config.json`` with the checksums of ``folder/model.safetensors``:
    ``digests`` (tensor -> sha256) when the writer hashed the bytes as it wrote them, else read back."""
    meta = meta | {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    meta["tensor_sha256"] = digests if digests is not None else tensor_digests(folder / WEIGHTS)
    meta["config_sha256"] = config_digest(meta)
    (folder / QUANT_CONFIG).write_text(json.dumps(meta, indent=1))


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    format: str = "lowbit",
) -> Path:
    """Write ``model`` (quantized or not) to ``out_dir`` atomically; returns the folder. An existing
    ``out_dir`` is replaced only with ``overwrite`` and only if it is a lowbit checkpoint or empty.
    ``format``: "lowbit" (this module's layout) or "compressed-tensors" (a Hugging Face folder that
    transformers and vLLM load, ``lowbit.export.compressed_tensors``)."""
    if format == "compressed-tensors":
        from lowbit.export.compressed_tensors import export_compressed_tensors

        stats = export_compressed_tensors(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
        return Path(stats["out"])
    if format != "lowbit":
        raise LowbitError(f"unknown checkpoint format {format!r}; available: lowbit, compressed-tensors")
    modules = {fqn: m.config_entry() for fqn, m in model.named_modules() if isinstance(m, QuantizedModule)}
    tensors, aliases = dedupe_state(model.state_dict())
    basis = getattr(model, "lowbit_basis", None)
    tensors.update(basis_tensors(basis or {}))
    meta = {
        "config": getattr(model, "lowbit_config", None),
        "modules": modules,
        "aliases": aliases,
        "identity": list(getattr(model, "lowbit_identity", [])),
        "source": getattr(model, "lowbit_source", None),
        "inputs": getattr(model, "lowbit_inputs", None),
        "basis": None if basis is None else sorted(basis),
    }
    with atomic_dir(out_dir, overwrite, replaceable=is_checkpoint) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME})
        write_quant_config(tmp, meta)
        hf_config = getattr(model, "config", None)
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            cfg = hf_config.to_dict()
            cfg.pop("quantization_config", None)  # e.g. the GGUF loader's; lowbit's own lives beside it
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def read_quant_config(folder: str | os.PathLike) -> dict:
    """Parsed and validated ``quant_config.json`` of a saved folder (``lowbit.export.validate``)."""
    path = Path(folder) / QUANT_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a lowbit checkpoint folder)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, larger than any lowbit config")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]})") from None
    return check_meta(meta, path, FORMAT_VERSION)


def _verify_config(meta: dict, path: Path) -> None:
    if meta.get("config_sha256") is None:
        warnings.warn(f"{path}: written before lowbit recorded checksums; not verified", stacklevel=3)
    elif config_digest(meta) != meta["config_sha256"]:
        raise CheckpointError(f"{path}: contents do not match its config_sha256 (edited or corrupted)")


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header of ``path`` (no tensor data is read)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupted ({str(e)[:120]})") from None


def _read_tensors(path: Path, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
    if verify and meta.get("tensor_sha256") is not None:
        want, got = meta["tensor_sha256"], tensor_digests(path)
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        if bad:
            raise CheckpointError(f"{path}: tensor {bad[0]} does not match its sha256 in {QUANT_CONFIG}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupted ({str(e)[:120]})") from None


def _skeleton(folder: Path, source: str | None) -> nn.Module:
    """The model to load into: a bundled vision model's architecture (by ``source``), else an empty
    (meta-device parameters) Hugging Face model built from ``config.json`` (never remote code)."""
    from lowbit.models.vision import VISION_MODELS

    if source in VISION_MODELS:
        return VISION_MODELS[source].build().eval()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: missing; pass model= to load into your own module")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lowbit.models.checks import read_hf_config

    read_hf_config(folder)  # no remote code, a model_type transformers knows
    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        causal = any(str(a).endswith("ForCausalLM") for a in cfg.architectures or ["ForCausalLM"])
        with init_empty_weights():
            return (AutoModelForCausalLM if causal else AutoModel).from_config(
                cfg, dtype=torch.float32, trust_remote_code=False
            )
    except (ValueError, OSError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model ({str(e)[:160]})") from None


def load(folder: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by ``save``, or a folder quantized by GPTQ, AWQ or compressed-tensors tools
    (``lowbit.export.peers``).
    ``model``: a float skeleton to load into (else from config.json).
    ``verify``: check the sha256 of the config and of every tensor (False skips that for speed; the
    structure, shape and qparam checks always run). Raises ``CheckpointError`` naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if is_peer(folder):  # quantized by another tool: repacked into lowbit's layers
        model = load_peer(folder, model if model is not None else _skeleton(folder, None))
        check_loaded(model, folder)
        return model
    meta = read_quant_config(folder)
    if verify:
        _verify_config(meta, folder / QUANT_CONFIG)
    header = {k: v for k, v in _header(folder / WEIGHTS).items() if not k.startswith(BASIS_PREFIX)}
    model = model if model is not None else _skeleton(folder, meta.get("source"))
    _build_structure(model, meta, folder / QUANT_CONFIG)
    _check_against_header(model, header, meta.get("aliases", {}), folder / WEIGHTS)
    tensors = _read_tensors(folder / WEIGHTS, meta, verify)
    model.lowbit_basis = _basis(tensors, meta, folder / WEIGHTS)
    for alias, canonical in meta.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    _assign(model, tensors, folder / WEIGHTS)
    check_loaded(model, folder / WEIGHTS)
    model.lowbit_config = meta.get("config")
    return model.eval()


def _basis(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> dict | None:
    """Pop the stored channel rescalings (``lowbit.transforms.basis``) out of ``tensors``; None when the
    writer recorded none (older checkpoints, streamed ones)."""
    try:
        basis = basis_from_tensors(tensors)
    except LowbitError as e:
        raise CheckpointError(f"{path}: {e}") from None
    names = meta.get("basis")
    if names is None and not basis:
        return None
    if sorted(basis) != sorted(names or []):
        raise CheckpointError(f"{path}: stored basis tensors do not match the basis list in {QUANT_CONFIG}")
    return basis


def _build_structure(model: nn.Module, meta: dict, path: Path) -> None:
    """Replace folded/fused modules by ``nn.Identity`` and swap in the quantized modules (built on the
    meta device: nothing is allocated before the header check)."""
    from lowbit.nn.modules import QMODULES

    for fqn in meta.get("identity", []):
        _swap(model, fqn, nn.Identity(), path)
    model.lowbit_identity = list(meta.get("identity", []))
    for key in ("source", "inputs"):
        if meta.get(key) is not None:
            setattr(model, f"lowbit_{key}", meta[key])
    for fqn, entry in meta["modules"].items():
        try:
            with torch.device("meta"):
                q = QMODULES[entry["type"]].from_entry(entry)
        except LowbitError as e:
            raise CheckpointError(f"{path}: module {fqn}: {e}") from None
        _swap(model, fqn, q, path)


def _swap(model: nn.Module, fqn: str, new: nn.Module, path: Path) -> None:
    try:
        model.get_submodule(fqn)
        model.set_submodule(fqn, new)
    except (AttributeError, TypeError, ValueError, KeyError):
        raise CheckpointError(f"{path}: module {fqn[:200]} not in the model") from None


def _check_against_header(model: nn.Module, header: dict, aliases: dict, path: Path) -> None:
    """Names and shapes the model expects vs. those stored (aliases resolved), before reading data."""
    expected = model.state_dict(keep_vars=True)
    bad_alias = sorted(a for a, c in aliases.items() if c not in header or a in header)
    if bad_alias:
        raise CheckpointError(f"{path}: alias {bad_alias[0]} names no stored tensor or shadows one")
    stored = set(header) | set(aliases)
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, want in expected.items():
        have = header[aliases.get(name, name)]
        if tuple(want.shape) != have:
            raise CheckpointError(f"{path}: {name} has shape {have}, the model expects {tuple(want.shape)}")


def check_loaded(model: nn.Module, path: Path) -> None:
    """``CheckpointError`` unless every tensor is loaded (none left on meta), every float parameter is
    finite and every quantized module's qparams are sound (``QuantizedModule.state_problem``)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"{path}: {name} was never loaded")
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{path}: {name} holds NaN or Inf")
    for fqn, m in model.named_modules():
        problem = m.state_problem() if isinstance(m, QuantizedModule) else None
        if problem:
            raise CheckpointError(f"{path}: module {fqn}: {problem}")


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` into ``model`` by assignment, with errors that name the tensor and file. Names
    and shapes were checked against the header (``_check_against_header``); dtypes are checked here."""
    expected = model.state_dict(keep_vars=True)
    for name, t in tensors.items():
        want = expected[name]
        if want.dtype != t.dtype:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(t.shape)} {t.dtype}, the model expects "
                f"{tuple(want.shape)} {want.dtype}"
            )
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise LowbitError(f"{path}: {str(e)[:300]}") from None
