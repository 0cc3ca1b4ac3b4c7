"""Measurement: perplexity, accuracy and agreement, embedding similarity, checkpoint size (real bytes)."""

from lowbit.eval.accuracy import accuracy, agreement, predict
from lowbit.eval.embeddings import cosine_to_reference, word_similarity
from lowbit.eval.perplexity import perplexity
from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes, tensor_bytes

__all__ = [
    "accuracy",
    "agreement",
    "cosine_to_reference",
    "dir_bytes",
    "fp32_checkpoint_bytes",
    "perplexity",
    "predict",
    "tensor_bytes",
    "word_similarity",
]
