"""Helpers shared by tests in several folders (tests/ is on sys.path through tests/conftest.py)."""

import torch


def tiny_llama(vocab=64, hidden=32, intermediate=64, dtype=torch.float32, **config):
    """A 2-layer Llama with tied embeddings and fixed random weights (seed 0), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **config,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()
