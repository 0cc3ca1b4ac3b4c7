"""lowbit: quantization that makes trained networks smaller and faster, and measures it.

    import lowbit
    model, tok = lowbit.models.load("smollm2-135m")
    lowbit.quantize_(model, lowbit.WeightOnly(bits=4, group_size=128))
    lowbit.save(model, "out/w4g128", tokenizer=tok)
    model = lowbit.load("out/w4g128")

    # GPTQ on calibration text, block by block; quantize_folder reads a Hugging Face folder one
    # block at a time instead (models larger than memory) and resumes after an interruption
    model, tok = lowbit.models.load("smollm2-135m")
    gptq, calib = lowbit.WeightOnly(method="gptq"), lowbit.data.calib_batches(tok, 128, 512)
    lowbit.quantize_(model, gptq, calib)
    lowbit.quantize_folder(lowbit.models.cached_folder("smollm2-135m"), gptq, "out/gptq", calib)

Importing lowbit loads torch only: no CUDA initialisation, no model or data access. ``models``, ``qat``,
``autotune``, ``data``, ``decode``, ``eval`` and ``workflows`` are imported on first use.
"""

from __future__ import annotations

import importlib

from lowbit.core import (
    CheckpointError,
    FormatVersionError,
    LowbitError,
    NonFiniteError,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
)
from lowbit.export import load, save
from lowbit.export.streaming import quantize_folder
from lowbit.nn import QDynamicLinear, QEmbedding, QLinear, QStaticConv2d, QStaticLinear
from lowbit.transforms import (
    Int8Dynamic,
    QuantSummary,
    SmoothQuant,
    StaticW8A8,
    WeightOnly,
    parse_scheme,
    quantize_,
)
from lowbit.transforms.comm import TorchComm

__version__ = "0.1.0"

_LAZY = ("models", "data", "eval", "qat", "autotune", "workflows", "decode")

__all__ = [
    "CheckpointError",
    "FormatVersionError",
    "Int8Dynamic",
    "LowbitError",
    "NonFiniteError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QDynamicLinear",
    "QEmbedding",
    "QLinear",
    "QStaticConv2d",
    "QStaticLinear",
    "QuantSpec",
    "QuantSummary",
    "TorchComm",
    "SmoothQuant",
    "StaticW8A8",
    "WeightOnly",
    "__version__",
    "generate",
    "load",
    "parse_scheme",
    "quantize_",
    "quantize_folder",
    "save",
    *_LAZY,
]


def generate(model, input_ids, max_new_tokens: int, **kw):
    """Greedy continuation through the fast decode path: ``lowbit.decode.generate``."""
    from lowbit.decode import generate as fast_generate

    return fast_generate(model, input_ids, max_new_tokens, **kw)


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"lowbit.{name}")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
