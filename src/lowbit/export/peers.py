"""Hugging Face folders quantized by other tools, loaded into lowbit's own layers (``lowbit.load``).

A peer folder has no lowbit ``quant_config.json`` but a ``quantization_config`` in its config.json, or
an AutoGPTQ ``quantize_config.json`` beside it (both: they must agree). Its ``quant_method`` picks the
importer from ``IMPORTERS`` (quant_method -> ``importer(qcfg, where) -> PeerLayout``; see
``lowbit.export.peer_formats`` for GPTQ and AWQ, ``lowbit.export.ct_import`` for
compressed-tensors), which validates the config before any tensor is read.
``load_peer`` then reads the safetensors files lazily (one tensor at a time, shape and dtype checked
against the model first), swaps every ``nn.Linear`` whose weight the folder stores quantized for the
``QLinear`` the importer repacks it into, and loads the other tensors (embeddings, norms, a float LM head)
as float32. A tensor that is missing or of the wrong shape or dtype, and a tensor that no layer of the
model takes, is a ``CheckpointError`` naming it. The model remembers what it was imported from
(``lowbit_config``, type "imported"); it saves as an ordinary lowbit checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lowbit.core.errors import CheckpointError
from lowbit.export.ct_import import compressed_tensors_layout
from lowbit.export.peer_formats import FLOATS, PeerLayout, PeerTensors, awq, gptq
from lowbit.models.checks import QUANT_CONFIG, check_safetensors, read_hf_config, weight_files

GPTQ_CONFIG = "quantize_config.json"  # AutoGPTQ's, beside a config.json without quantization_config
MAX_JSON_BYTES = 16 << 20
AGREE = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")

Importer = Callable[[dict, str], PeerLayout]
IMPORTERS: dict[str, Importer] = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors_layout}


def register_importer(quant_method: str, importer: Importer) -> None:
    """Load folders whose ``quantization_config.quant_method`` is ``quant_method`` with ``importer``."""
    IMPORTERS[quant_method] = importer


def is_peer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a Hugging Face folder quantized by another tool (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / QUANT_CONFIG).is_file():
        return False
    if (folder / GPTQ_CONFIG).is_file():
        return True
    try:
        cfg = _json(folder / "config.json")
    except CheckpointError:
        return False  # not a model folder lowbit reads; the float loader says why
    return cfg.get("quantization_config") is not None


def _json(path: Path) -> dict:
    """The JSON object in ``path``; ``CheckpointError`` naming it otherwise."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, larger than any model config")
        data = json.loads(path.read_bytes())
    except OSError:
        raise CheckpointError(f"{path}: missing or unreadable") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def peer_config(folder: str | os.PathLike) -> tuple[dict, str]:
    """``(quantization config, where it was read)`` of a peer folder, with its ``quant_method`` (AutoGPTQ's
    ``quantize_config.json`` may omit it: gptq); ``CheckpointError`` if there is none, it is malformed, or
    config.json and quantize_config.json disagree."""
    folder = Path(folder)
    found = []
    qc = _json(folder / "config.json").get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config is not a JSON object")
        found.append((qc, f"{folder / 'config.json'} quantization_config"))
    if (folder / GPTQ_CONFIG).is_file():
        found.append(({"quant_method": "gptq"} | _json(folder / GPTQ_CONFIG), str(folder / GPTQ_CONFIG)))
    if not found:
        raise CheckpointError(f"{folder}: no quantization_config in config.json and no {GPTQ_CONFIG}")
    (qc, where), others = found[0], found[1:]
    for other, other_where in others:
        for key in AGREE:
            if key in qc and key in other and qc[key] != other[key]:
                raise CheckpointError(
                    f"{where} and {other_where} disagree on {key} ({qc[key]!r} vs {other[key]!r})"
                )
    method = qc.get("quant_method")
    if not isinstance(method, str):
        raise CheckpointError(f"{where}: quant_method {method!r} is not a string")
    return qc | {"quant_method": method.lower()}, where


def load_peer(folder: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load peer folder ``folder`` into ``model``, a float skeleton of its architecture (parameters may
    be on the meta device): quantized Linears become ``QLinear``, the rest is loaded as stored (cast to
    the skeleton's dtype). Returns ``model`` in eval mode; ``CheckpointError`` names what is wrong."""
    folder = Path(folder)
    qcfg, where = peer_config(folder)
    importer = IMPORTERS.get(qcfg["quant_method"])
    if importer is None:
        raise CheckpointError(
            f"{where}: quant_method {qcfg['quant_method']!r} is not one lowbit imports "
            f"(known: {', '.join(sorted(IMPORTERS))})"
        )
    layout = importer(qcfg, where)
    tensors = PeerTensors(folder, _weight_files(folder, qcfg))
    quantized = _repack(model, tensors, layout)
    if not quantized:
        raise CheckpointError(
            f"{folder}: {where} names {qcfg['quant_method']}, but no Linear layer is stored quantized"
        )
    _load_floats(model, tensors, quantized)
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    left = [n for n in tensors.unread() if not any(re.search(p, n) for p in ignore)]
    if left:
        raise CheckpointError(f"{folder}: {len(left)} tensors that no layer of the model takes: {left[:5]}")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are lowbit's now; lowbit.save writes its own
    model.lowbit_config = layout.summary
    model.lowbit_identity = []
    model.lowbit_basis = None  # unknown: AWQ rescaled the weights and the norms before them
    return model.eval()


def _weight_files(folder: Path, qcfg: dict) -> list[Path]:
    """The folder's safetensors files (``lowbit.models.checks.weight_files``, or AutoGPTQ's
    ``<model_file_base_name>.safetensors``), their headers checked."""
    files = weight_files(folder, read_hf_config(folder).get("transformers_weights"))
    base = qcfg.get("model_file_base_name")
    if not files and isinstance(base, str) and (folder / f"{base}.safetensors").is_file():
        files = weight_files(folder, f"{base}.safetensors")
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights (other weight formats are never loaded)")
    for path in files:
        check_safetensors(path)
    return files


def _repack(model: nn.Module, tensors: PeerTensors, layout: PeerLayout) -> list[str]:
    """Swap each ``nn.Linear`` the folder stores quantized for its ``QLinear``; returns their names."""
    done = []
    for fqn, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            q = layout.repack(fqn, m, tensors)
            if q is not None:
                model.set_submodule(fqn, q)
                done.append(fqn)
    return done


def _load_floats(model: nn.Module, tensors: PeerTensors, quantized: list[str]) -> None:
    """Assign every other parameter and persistent buffer of ``model`` from ``tensors``; a tied weight
    the folder does not store (an LM head tied to the embedding) shares its source's tensor."""
    prefixes = tuple(f"{fqn}." for fqn in quantized)
    want = {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(prefixes)}
    loaded = {}
    for name, t in want.items():
        if name in tensors:
            dtypes = FLOATS if t.is_floating_point() else (t.dtype,)
            loaded[name] = tensors.get(name, tuple(t.shape), dtypes, "as the model has it").to(t.dtype)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name in sorted(set(want) - set(loaded)):
        if tied.get(name) not in loaded:
            raise CheckpointError(f"{tensors.folder}: tensor {name} is missing")
        loaded[name] = loaded[tied[name]]
    model.load_state_dict(loaded, strict=False, assign=True)
