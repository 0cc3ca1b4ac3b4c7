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


def ort_int8_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels sum exactly on this CPU.

    On x86 without VNNI (AVX2, AVX-512 without VNNI) they use vpmaddubsw, whose pairwise u8*s8 sums saturate
    at int16 (2 x 255 x 127 > 32767; measured here: 64 products of 255 x 127 give 1048544, not 2072640), so
    ONNX Runtime's outputs differ from exact integer math. onnx.reference is exact on every CPU."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def assert_ort_matches(got, ours, tol):
    """ONNX Runtime's output ``got`` is within ``tol`` of lowbit's ``ours`` where its int8 sums are exact
    (``ort_int8_exact``); elsewhere only its shape and finiteness are checked, and the exactness check
    rests on onnx.reference."""
    import numpy as np

    assert got.shape == ours.shape and np.isfinite(got).all()
    if ort_int8_exact():
        assert np.abs(got - ours).max() <= tol


class Crashing:
    """``data``'s batches until step ``at``, then an error, as a process killed mid-run."""

    def __init__(self, data, at):
        self.data, self.at = data, at

    def iter_from(self, step):
        for i, batch in enumerate(self.data.iter_from(step), step):
            if i == self.at:
                raise RuntimeError("power cut")
            yield batch


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``lowbit *argv`` run in this process."""
    from lowbit.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
