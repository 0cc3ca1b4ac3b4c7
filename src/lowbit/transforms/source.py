"""The tensors of a Hugging Face folder, read whole, by rows or by row ids: where a streamed run's
blocks and tables come from (``lowbit.export.streaming.quantize_folder`` and its block store). This
module only reads; rounding is ``sequential`` / ``swap``'s, writing is ``lowbit.export``'s.

Big tables (the input embedding, an untied LM head: 151936 x 896 float32 = 545 MB for Qwen2.5-0.5B)
are never held whole as floats. While capturing, the embedding reads only the rows of the calibration
token ids (``embedding_rows``); at the end, ``swap.quantize_tables`` rounds each table ``CHUNK_ROWS``
rows at a time, read by ``Source.rows``, straight into the quantized module's buffers. Each read opens
the file for that call only: safetensors maps the whole file, and the pages a read touches count as
resident until the mapping is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.core.errors import CheckpointError
from lowbit.transforms import swap

WEIGHTS = "model.safetensors"  # Hugging Face's name for unsharded weights
INDEX = "model.safetensors.index.json"  # ... and for the index of sharded ones
HEAD = "lm_head"  # read last: an untied LM head can be as big as the embeddings


def in_head(name: str) -> bool:
    return name == HEAD or name.startswith(HEAD + ".")


class Source:
    """The tensors of a Hugging Face folder (one safetensors file or an index-sharded set). Every
    read opens the file it needs and copies the tensors out, so no mapping stays resident."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
            elif (folder / WEIGHTS).is_file():
                with safe_open(str(folder / WEIGHTS), "pt") as f:
                    weight_map = dict.fromkeys(f.keys(), WEIGHTS)
            else:
                raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX}")
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
