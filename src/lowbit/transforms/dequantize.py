"""``dequantize_(model)``: quantized modules back to float ``nn.Linear``/``nn.Embedding``, in place.

The float weights are the dequantized values (what the quantized model computes with), so the result is
the quantized model's float twin: the baseline ``lowbit bench`` times against a checkpoint. Modules that
shared stored weights (a tied LM head) share one float Parameter afterwards.
"""

from __future__ import annotations

from torch import nn

from lowbit.nn.modules import QEmbedding, QLinear


def _float_module(q: nn.Module, weight: nn.Parameter) -> nn.Module:
    if isinstance(q, QEmbedding):
        m = nn.Embedding(q.num_embeddings, q.embedding_dim, q.padding_idx, dtype=q.dtype)
    else:
        m = nn.Linear(q.in_features, q.out_features, q.bias is not None, dtype=q.dtype)
        if q.bias is not None:
            m.bias = nn.Parameter(q.bias.detach().to(q.dtype).clone())
    m.weight = weight
    return m


def dequantize_(model: nn.Module) -> int:
    """Replace every ``QLinear``/``QEmbedding`` (and subclasses) by its float twin; returns how many."""
    shared: dict[int, nn.Parameter] = {}  # qweight storage -> float Parameter
    targets = [(f, m) for f, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))]
    for fqn, q in targets:
        key = q.qweight.untyped_storage().data_ptr()
        if key not in shared:
            shared[key] = nn.Parameter(q.dequantized_weight(q.dtype), requires_grad=False)
        model.set_submodule(fqn, _float_module(q, shared[key]))
    return len(targets)
