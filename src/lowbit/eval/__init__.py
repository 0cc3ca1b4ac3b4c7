"""Measurement: perplexity, checkpoint size (real bytes on disk)."""

from lowbit.eval.perplexity import perplexity
from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes, tensor_bytes

__all__ = ["dir_bytes", "fp32_checkpoint_bytes", "perplexity", "tensor_bytes"]
