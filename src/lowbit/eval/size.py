"""Sizes in bytes: files on disk, tensors in memory, and a model's fp32 safetensors checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of file ``path``, or the summed sizes (``st_size``) of all files under folder ``path``.

    Symbolic links are not followed (they count as 0 bytes).
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise LowbitError(f"{path}: no such file or folder")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _memory_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor covers: same key = same bytes (e.g. tied weights)."""
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    if ptr == 0:  # meta or empty: no real memory to share
        return ("id", id(t))
    return (t.device.type, t.device.index, ptr, t.storage_offset() * t.element_size(), t.nbytes)


def unique_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` minus tensors covering the same memory as an earlier one (first name kept)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state_dict.items():
        key = _memory_key(t)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def tensor_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors in ``state_dict``, counting shared memory (tied weights) once."""
    return sum(t.nbytes for t in unique_tensors(state_dict).values())


def fp32_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's unique persistent tensors, floating point ones as float32, contiguous, on CPU."""
    out = {}
    for name, t in unique_tensors(model.state_dict()).items():
        t = t.detach().to("cpu")
        out[name] = (t.float() if t.is_floating_point() else t).contiguous()
    return out


def fp32_checkpoint_bytes(model: nn.Module) -> int:
    """Bytes on disk of the model's fp32 safetensors checkpoint (``model.safetensors``).

    Measured, not estimated: the unique-storage fp32 state dict is written with safetensors (with
    the ``{"format": "pt"}`` metadata transformers writes) to a temp folder and the file is stat'ed.
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="lowbit-size-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(fp32_state_dict(model), str(path), metadata={"format": "pt"})
        return path.stat().st_size


_COMPONENT = {  # buffer name of a quantized module -> component
    "qweight": "codes",
    "scale": "scales",
    "zero_point": "zero_points",
    "levels": "tables",
    "input_scale": "activation_qparams",
    "input_zero_point": "activation_qparams",
    "output_scale": "activation_qparams",
    "output_zero_point": "activation_qparams",
}


def size_components(model: nn.Module) -> dict[str, int]:
    """In-memory bytes of the model's persistent tensors by component: ``codes`` (bit-packed weight
    codes), ``scales``, ``zero_points``, ``tables`` (codebook levels), ``activation_qparams`` (static
    layers' input/output scales and zero points) and ``float`` (everything else: unquantized layers,
    norms, biases, outlier columns). Shared memory (tied weights) counts once; sums to ``tensor_bytes``."""
    from lowbit.nn.modules import QuantizedModule

    out = dict.fromkeys(["codes", "scales", "zero_points", "tables", "activation_qparams", "float"], 0)
    for full, t in unique_tensors(model.state_dict(keep_vars=True)).items():
        owner, _, name = full.rpartition(".")
        quantized = isinstance(model.get_submodule(owner), QuantizedModule)
        out[_COMPONENT.get(name, "float") if quantized else "float"] += t.nbytes
    return out
