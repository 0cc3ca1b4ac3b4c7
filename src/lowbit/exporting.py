"""``lowbit export``: a checkpoint written for another runtime, one writer per format.

| format                 | writer (``lowbit.export.``)     | read by                                |
|------------------------|---------------------------------|----------------------------------------|
| ``onnx``               | ``onnx`` (QDQ)                  | ONNX Runtime                           |
| ``gguf``               | ``gguf`` (Q8_0/Q4_0/Q4_1)       | llama.cpp, transformers' GGUF loader   |
| ``compressed-tensors`` | ``compressed_tensors``          | transformers + compressed-tensors, vLLM |
| ``tflite``             | ``tflite``                      | LiteRT (``ai-edge-litert``) interpreter |

Every writer checks that the format can hold the checkpoint before writing anything and writes its
output atomically; a checkpoint it cannot hold is a ``LowbitError`` saying what would fit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.workflows import load_any

FORMATS = ("onnx", "gguf", "compressed-tensors", "tflite")


def export(ref: str | os.PathLike, fmt: str, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write checkpoint (or float model) ``ref`` as ``fmt`` (one of ``FORMATS``) to ``out``; returns stats
    (``out``, ``bytes``, ``seconds`` and the writer's own)."""
    if fmt not in FORMATS:
        raise LowbitError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    if Path(out).exists() and not overwrite:
        raise LowbitError(f"{out} already exists; pass --overwrite to replace it")
    model, tokenizer = load_any(ref, progress=False)
    t0 = time.perf_counter()
    writer = {"onnx": _onnx, "gguf": _gguf, "compressed-tensors": _compressed_tensors, "tflite": _tflite}[fmt]
    stats = writer(model, tokenizer, ref, Path(out), overwrite)
    return {"model": str(ref), "format": fmt, **stats, "seconds": round(time.perf_counter() - t0, 2)}


def _onnx(model: nn.Module, tokenizer, ref, out: Path, overwrite: bool) -> dict:
    from lowbit.export.onnx import example_from_spec, export_onnx

    spec = getattr(model, "lowbit_inputs", None)
    if not spec:
        raise LowbitError(f"{ref}: no recorded input shapes (quantize it with calibration data first)")
    path = export_onnx(model, example_from_spec(spec), out, overwrite=overwrite)
    return {"out": str(path), "bytes": path.stat().st_size}


def _gguf(model: nn.Module, tokenizer, ref, out: Path, overwrite: bool) -> dict:
    """GGUF with the metadata and tokenizer of the GGUF file the checkpoint's float model came from."""
    from lowbit.export.gguf import export_gguf
    from lowbit.models.registry import BUNDLED, bundled_gguf

    source = getattr(model, "lowbit_source", None) or ""
    if source in BUNDLED and not BUNDLED[source].split:
        gguf_file = bundled_gguf(source)
    elif source.endswith(".gguf") and Path(source).is_file():
        gguf_file = Path(source)
    else:
        raise LowbitError(
            f"{ref}: GGUF export copies the tokenizer and metadata of the GGUF file the float model was "
            f"read from; its source {source or '(none)'} is not one (quantize a bundled GGUF model or a "
            ".gguf file)"
        )
    return export_gguf(model, gguf_file, out)


def _compressed_tensors(model: nn.Module, tokenizer, ref, out: Path, overwrite: bool) -> dict:
    from lowbit.export.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(model, out, tokenizer=tokenizer, overwrite=overwrite)


def _tflite(model: nn.Module, tokenizer, ref, out: Path, overwrite: bool) -> dict:
    from lowbit.export.tflite import export_tflite

    return export_tflite(model, out, overwrite=overwrite)
