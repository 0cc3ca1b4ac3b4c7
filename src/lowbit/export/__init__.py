"""Export: lowbit checkpoints (safetensors + quant_config.json); ONNX QDQ comes with issue 4."""

from lowbit.core.fsio import atomic_dir
from lowbit.export.checkpoint import FORMAT_VERSION, load, read_quant_config, save

__all__ = ["FORMAT_VERSION", "atomic_dir", "load", "read_quant_config", "save"]
