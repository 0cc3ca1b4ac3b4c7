"""``save``/``load``: safetensors with the stored codes plus a versioned ``quant_config.json``.

Layout of a saved folder (see docs/ARCHITECTURE.md):

    quant_config.json   format, format_version, config, modules {fqn: entry}, aliases {name: canonical},
                        identity [fqns replaced by nn.Identity: folded BatchNorms, fused activations],
                        source (bundled model name, to rebuild a skeleton), inputs (example shapes)
    model.safetensors   the model's state dict; tensors that share storage are stored once (aliases)
    config.json, tokenizer files   for Hugging Face models, so ``load`` can rebuild the skeleton

The format is named inside the folder, never in file names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core.errors import CheckpointError, FormatVersionError, LowbitError
from lowbit.core.fsio import atomic_dir
from lowbit.nn.modules import QMODULES, QuantizedModule

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def save(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized or not) to ``out_dir`` atomically; returns the folder."""
    modules = {fqn: m.config_entry() for fqn, m in model.named_modules() if isinstance(m, QuantizedModule)}
    tensors, aliases = _dedupe(model.state_dict())
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": getattr(model, "lowbit_config", None),
        "modules": modules,
        "aliases": aliases,
        "identity": list(getattr(model, "lowbit_identity", [])),
        "source": getattr(model, "lowbit_source", None),
        "inputs": getattr(model, "lowbit_inputs", None),
    }
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME})
        (tmp / QUANT_CONFIG).write_text(json.dumps(meta, indent=1))
        hf_config = getattr(model, "config", None)
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            cfg = hf_config.to_dict()
            cfg.pop("quantization_config", None)  # e.g. the GGUF loader's; lowbit's own lives beside it
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def read_quant_config(folder: str | os.PathLike) -> dict:
    """Parsed and validated ``quant_config.json`` of a saved folder."""
    path = Path(folder) / QUANT_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a lowbit checkpoint folder)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a lowbit quant config (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: format version {version!r} is newer than this lowbit reads "
            f"({FORMAT_VERSION}); upgrade lowbit"
        )
    return meta


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupted ({e})") from None


def _skeleton(folder: Path, source: str | None) -> nn.Module:
    """The model to load into: a bundled vision model's architecture (by ``source``), else an empty
    (meta-device parameters) Hugging Face model built from ``config.json``."""
    from lowbit.models.vision import VISION_MODELS

    if source in VISION_MODELS:
        return VISION_MODELS[source].build().eval()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: missing; pass model= to load into your own module")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    causal = any(a.endswith("ForCausalLM") for a in cfg.architectures or ["ForCausalLM"])
    with init_empty_weights():
        return (AutoModelForCausalLM if causal else AutoModel).from_config(cfg, dtype=torch.float32)


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by ``save``. ``model``: a float skeleton to load into (else from config.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    meta = read_quant_config(folder)
    tensors = _read_tensors(folder)
    model = model if model is not None else _skeleton(folder, meta.get("source"))
    for fqn in meta.get("identity", []):
        _module(model, fqn, folder)
        model.set_submodule(fqn, nn.Identity())
    model.lowbit_identity = list(meta.get("identity", []))
    for key in ("source", "inputs"):
        if meta.get(key) is not None:
            setattr(model, f"lowbit_{key}", meta[key])
    for fqn, entry in meta["modules"].items():
        cls = QMODULES.get(entry.get("type"))
        if cls is None:
            raise CheckpointError(
                f"{folder / QUANT_CONFIG}: module {fqn}: unknown type {entry.get('type')!r}"
            )
        _module(model, fqn, folder)
        model.set_submodule(fqn, cls.from_entry(entry))
    for alias, canonical in meta.get("aliases", {}).items():
        if canonical not in tensors:
            raise CheckpointError(f"{folder / WEIGHTS}: tensor {canonical} (aliased by {alias}) missing")
        tensors[alias] = tensors[canonical]
    _assign(model, tensors, folder / WEIGHTS)
    model.lowbit_config = meta.get("config")
    return model.eval()


def _module(model: nn.Module, fqn: str, folder: Path) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise CheckpointError(f"{folder / QUANT_CONFIG}: module {fqn} not in the model") from None


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``tensors`` into ``model`` by assignment, with errors that name the tensor and file."""
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        want = expected[name]
        if tuple(want.shape) != tuple(t.shape) or want.dtype != t.dtype:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(t.shape)} {t.dtype}, the model expects "
                f"{tuple(want.shape)} {want.dtype}"
            )
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise LowbitError(f"{path}: {e}") from None
