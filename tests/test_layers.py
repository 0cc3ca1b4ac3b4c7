"""Architecture guards: imports go one way, and importing lowbit is lean (no CUDA, no transformers)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
# Each package may import only packages of a lower rank (same rank = itself).
RANK = {
    "core": 0,
    "observers": 1,
    "algorithms": 2,
    "kernels": 3,
    "nn": 4,
    "transforms": 5,
    "data": 1,
    "models": 5,  # bundled models train on bundled data and use lowbit.nn's float Add (lowbit.models.vision)
    "decode": 5.5,  # fast greedy decoding over nn's quantized layers and kernels
    "export": 6,
    "qat": 6,  # training twins over nn/transforms; deploys through lowbit.nn layers
    "eval": 6,
    "training": 6.5,  # the QAT job (lowbit.qat + export), called by workflows
    "workflows": 7,
    "tasks": 7.2,  # lowbit eval's tasks, over workflows' loader
    "exporting": 7.2,  # lowbit export: one writer per format, over workflows' loader
    "harness": 7.3,  # lm-eval's model adapter and local tasks, over workflows' loader and data
    "autotune": 7.5,  # mixed precision: plans over transforms, its CLI job over workflows
    "reporting": 7.5,  # lowbit report / debug: drivers over eval and workflows
    "cli": 8,
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("lowbit."))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_import(path):
    rel = path.relative_to(SRC)
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if own not in RANK:
        return  # lowbit/__init__.py re-exports the public API
    for dep in _imports(path):
        assert dep == own or RANK[dep] < RANK[own], f"{rel} imports lowbit.{dep} (upward)"


def _module_imports(path: Path) -> set[str]:
    """Modules of lowbit that ``path`` imports anywhere in it (inside functions too)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit."):
            deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("lowbit.")}
    return deps


@pytest.mark.parametrize("package", ["transforms", "export"])
def test_no_import_cycle(package):
    """No module of ``package`` imports, directly or through others of it, a module that imports it."""
    files = {f"lowbit.{package}.{p.stem}": p for p in (SRC / package).glob("*.py") if p.stem != "__init__"}
    graph = {name: _module_imports(p) & files.keys() - {name} for name, p in files.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    cyclic = sorted(name for name in graph if name in reachable(name))
    assert not cyclic, f"import cycle through {cyclic}"


def test_import_is_lean():
    code = (
        "import sys, lowbit, torch; "
        "assert not torch.cuda.is_initialized(); "
        "heavy = [m for m in ('transformers', 'gensim', 'accelerate', 'onnx') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
