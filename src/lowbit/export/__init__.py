"""Export: lowbit checkpoints (safetensors + quant_config.json) and ONNX QDQ models (``export_onnx``).

``lowbit.export.onnx`` imports onnx only when a model is exported.
"""

from lowbit.core.fsio import atomic_dir
from lowbit.export.checkpoint import FORMAT_VERSION, load, read_quant_config, save
from lowbit.export.onnx import export_onnx, float_twin

__all__ = ["FORMAT_VERSION", "atomic_dir", "export_onnx", "float_twin", "load", "read_quant_config", "save"]
