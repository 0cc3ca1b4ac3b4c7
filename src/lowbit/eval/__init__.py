"""Measurement: perplexity, accuracy and agreement, embedding similarity, checkpoint size (real bytes),
subgroup audit."""

from lowbit.eval.accuracy import accuracy, agreement, predict
from lowbit.eval.audit import Audit, GroupAudit, audit
from lowbit.eval.embeddings import cosine_to_reference, word_similarity
from lowbit.eval.perplexity import perplexity
from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes, tensor_bytes

__all__ = [
    "Audit",
    "GroupAudit",
    "accuracy",
    "agreement",
    "audit",
    "cosine_to_reference",
    "dir_bytes",
    "fp32_checkpoint_bytes",
    "perplexity",
    "predict",
    "tensor_bytes",
    "word_similarity",
]
