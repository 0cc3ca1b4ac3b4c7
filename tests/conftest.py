"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M, fp32, loaded once per session.

    The first run ever dequantizes the GGUF into the lowbit cache (~20-30 s); later runs read it.
    Tests must not modify the model in place (deep-copy it first).
    """
    from lowbit.models import load

    return load("smollm2-135m", progress=False)
