"""The tensors of a Hugging Face folder for ``quantize_folder``: read whole, by rows or by row ids.

Big tables (the input embedding, an untied LM head: 151936 x 896 float32 = 545 MB for Qwen2.5-0.5B)
are never held whole as floats. While capturing, the embedding reads only the rows of the calibration
token ids (``embedding_rows``); at the end, ``quantize_tables`` rounds each table ``CHUNK_ROWS`` rows
at a time straight from the file into the quantized module's buffers. Each read opens the file for
that call only: safetensors maps the whole file, and the pages a read touches count as resident until
the mapping is closed.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.core.codec import encode
from lowbit.core.errors import CheckpointError
from lowbit.export.checkpoint import WEIGHTS
from lowbit.nn.modules import FLOAT_TO_Q, QuantizedWeightModule
from lowbit.transforms import swap
from lowbit.transforms.quantize import QuantSummary
from lowbit.transforms.swap import Plan, Rounding

HEAD = "lm_head"  # read last: an untied LM head can be as big as the embeddings


def in_head(name: str) -> bool:
    return name == HEAD or name.startswith(HEAD + ".")


class Source:
    """The tensors of a Hugging Face folder (one safetensors file or an index-sharded set). Every
    read opens the file it needs and copies the tensors out, so no mapping stays resident."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
            elif (folder / WEIGHTS).is_file():
                with safe_open(str(folder / WEIGHTS), "pt") as f:
                    weight_map = dict.fromkeys(f.keys(), WEIGHTS)
            else:
                raise CheckpointError(f"{folder}: no {WEIGHTS} or model.safetensors.index.json")
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder}: unreadable safetensors weights ({e})") from None
        self.folder, self.weight_map = folder, weight_map
        self.files = sorted(set(weight_map.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    @contextmanager
    def _open(self, name: str) -> Iterator:
        try:
            with safe_open(str(self.folder / name), "pt") as f:
                yield f
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.folder / name}: unreadable ({e})") from None

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` (own memory, not a view of the file) for ``keys`` present in the folder."""
        out = {}
        for name in self.files:
            wanted = [k for k in keys if self.weight_map.get(k) == name]
            if wanted:
                with self._open(name) as f:
                    out |= {k: f.get_tensor(k).clone() for k in wanted}
        return out

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """``CheckpointError`` unless tensor ``key`` is in the folder with ``shape``."""
        if key not in self:
            raise CheckpointError(f"{self.folder}: tensor {key} missing from the weights")
        with self._open(self.weight_map[key]) as f:
            got = tuple(f.get_slice(key).get_shape())
        if got != tuple(shape):
            raise CheckpointError(f"{self.folder}: {key} has shape {got}, the config says {tuple(shape)}")

    def dtype(self, key: str) -> str:
        """Safetensors dtype name of tensor ``key`` ("F32", "BF16", ...)."""
        with self._open(self.weight_map[key]) as f:
            return f.get_slice(key).get_dtype()

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``key`` (own memory)."""
        with self._open(self.weight_map[key]) as f:
            return f.get_slice(key)[start:stop].clone()

    def take(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique, in range) of 2-D tensor ``key``: ``(len(ids), cols)``, read
        ``CHUNK_ROWS`` rows at a time keeping only the wanted ones."""
        step, parts = swap.CHUNK_ROWS, []
        with self._open(self.weight_map[key]) as f:
            table = f.get_slice(key)
            for a in range(0, table.get_shape()[0], step):
                sel = ids[(ids >= a) & (ids < a + step)]
                if sel.numel():
                    parts.append(table[a : a + step][sel - a])
        return torch.cat(parts)

    def stamp(self) -> dict:
        """Name -> [size, mtime_ns] of each weight file and config.json (what identifies the source)."""
        names = [*self.files, "config.json"]
        return {n: [(self.folder / n).stat().st_size, (self.folder / n).stat().st_mtime_ns] for n in names}


def materialise(module: nn.Module, prefix: str, source: Source, keys: Iterable[str] | None = None) -> None:
    """Replace ``module``'s meta tensors (``keys`` of its state dict, default all) by the source's,
    cast to the skeleton's dtype; ``CheckpointError`` naming a missing or misshapen tensor."""
    want = module.state_dict()
    keys = list(want if keys is None else keys)
    missing = [f"{prefix}{k}" for k in keys if f"{prefix}{k}" not in source]
    if missing:
        raise CheckpointError(f"{source.folder}: tensor {missing[0]} missing from the weights")
    read = source.read([f"{prefix}{k}" for k in keys])
    tensors = {}
    for k in keys:
        t = read.pop(f"{prefix}{k}")
        if tuple(t.shape) != tuple(want[k].shape):
            shapes = f"{tuple(t.shape)}, the config says {tuple(want[k].shape)}"
            raise CheckpointError(f"{source.folder}: {prefix}{k} has shape {shapes}")
        tensors[k] = t.to(want[k].dtype)
    module.load_state_dict(tensors, strict=len(keys) == len(want), assign=True)


def embedding_fqn(model: nn.Module) -> str | None:
    """Module name of the input embedding (``get_input_embeddings``), or None."""
    emb = model.get_input_embeddings()
    return next((n for n, m in model.named_modules() if m is emb), None)


@contextmanager
def embedding_rows(model: nn.Module, source: Source) -> Iterator[None]:
    """While inside: the input embedding, its weight on meta, reads only the rows of the ids ``(b, L)``
    it is given (a compact table, the ids renumbered into it), so capturing needs no float table.
    The module's own forward runs (e.g. Gemma's scaled embedding); ``padding_idx``, which only
    shapes gradients, is set aside meanwhile."""
    fqn = embedding_fqn(model)
    emb = model.get_submodule(fqn) if fqn is not None else None
    if emb is None or not emb.weight.is_meta:
        yield
        return
    key, weight, padding = f"{fqn}.weight", emb.weight, emb.padding_idx
    source.check(key, tuple(weight.shape))

    def compact(module: nn.Module, args: tuple, kwargs: dict):
        ids = args[0] if args else kwargs["input"]
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < weight.shape[0]:
            got = f"[{int(ids.min())}, {int(ids.max())}]"
            raise IndexError(f"token ids must lie in [0, {weight.shape[0]}), got ids in {got}")
        uniq, inverse = torch.unique(ids, return_inverse=True)
        module.weight = nn.Parameter(source.take(key, uniq).to(weight.dtype), requires_grad=False)
        return ((inverse, *args[1:]), kwargs) if args else (args, kwargs | {"input": inverse})

    emb.padding_idx = None
    handle = emb.register_forward_pre_hook(compact, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        emb.weight, emb.padding_idx = weight, padding


def _libc():
    return ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing). Without
    it, glibc's adaptive mmap threshold puts block-sized tensors on the heap, and RSS grows by tens of
    MB per block (measured: Qwen2.5-0.5B, 1.0 -> 2.1 GB over 24 blocks; flat with the trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MMAP_THRESHOLD = 1 << 20  # bytes; glibc's M_MMAP_THRESHOLD while streaming


def map_big_allocations() -> None:
    """Have glibc give every allocation of ``MMAP_THRESHOLD`` bytes or more its own mapping, unmapped
    when freed (``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing). Process-wide, and it ends glibc's
    adaptive threshold, under which a block's freed temporaries stay on the heap and the next phase's
    land beside them (measured, Qwen2.5-0.5B GPTQ block 0: peak RSS 1.44 -> 1.10 GB with the
    tokenizer freed too; same speed)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def _fill(q: QuantizedWeightModule, quantize: Rounding, source: Source, key: str, dtype, name: str) -> None:
    """``q.set_weight(by_rows(quantize, weight, ...))`` with the weight read ``CHUNK_ROWS`` rows at a
    time from ``source[key]``: the same chunks, so the same codes and qparams, bitwise."""
    source.check(key, (q.rows, q.cols))
    step = swap.CHUNK_ROWS if q.rows > swap.CHUNK_ROWS else max(q.rows, 1)
    scales, zps = [], []
    for a in range(0, q.rows, step):
        qt = quantize(source.rows(key, a, a + step).to(dtype), q.spec, name)
        q.qweight[a : a + step] = encode(qt.codes, q.spec.fmt)
        scales.append(qt.scale)
        zps.append(qt.zero_point)
        del qt
        trim_heap()  # the chunk's temporaries (a few times 29 MB for Qwen2.5) would stay on the heap
    q.scale = torch.cat(scales).contiguous()
    q.zero_point = None if zps[0] is None else torch.cat(zps).contiguous()


def quantize_tables(
    model: nn.Module,
    fqns: Sequence[str],
    plan: Plan,
    quantize: Rounding,
    select: Callable[[str], bool],
    summary: QuantSummary,
    source: Source,
) -> None:
    """Swap the modules ``fqns`` (embedding, LM head; weights on meta) for quantized ones filled from
    ``source`` a row chunk at a time, exactly as ``swap_weights(model, plan, select, summary, ...,
    quantize)`` would from the float tables (ties shared). Only for specs whose blocks lie within rows:
    other specs, and weights tied to them, stay on meta for the whole-tensor path. A bias must have
    been read in."""
    keys: dict[int, str] = {}  # id(meta weight) -> source key of its first owner
    done: dict[int, tuple[str, QuantizedWeightModule]] = {}
    left: set[int] = set()  # id(meta weight) left for the whole-tensor path
    for fqn in fqns:
        m = model.get_submodule(fqn)
        wid = id(m.weight)
        keys.setdefault(wid, f"{fqn}.weight")
        usable = type(m) in FLOAT_TO_Q and m.weight.is_meta and select(fqn)
        choice = plan(m) if usable else None
        if choice is None:
            continue
        cls, spec = choice
        owner = done.get(wid)
        if wid in left or (owner is None and spec.block_size(tuple(m.weight.shape))[0] != 1):
            left.add(wid)
            continue
        fill = partial(_fill, quantize=quantize, source=source, key=keys[wid], dtype=m.weight.dtype,
                       name=f"{fqn}.weight")  # fmt: skip
        q = swap.swap_module(model, fqn, m, cls, spec, owner, fill, summary)
        done.setdefault(wid, (fqn, q))
