"""The files of a streamed run (``lowbit.export.streaming.quantize_folder``): the staging folder, as a
block store for the block pipeline (``StagedStore``), and the final checkpoint assembled from it
(``write_checkpoint``, ``merge_safetensors``).

Staging (``.<out name>.lowbit-partial`` beside ``out``): ``block-<i>.safetensors`` (block ``i``'s tensors,
its module entries and summary in the metadata), ``hidden-<i>.safetensors`` (block ``i``'s input
activations, i.e. the quantized outputs of block ``i - 1``) and ``state.json`` (a fingerprint of source,
config, selection and calibration data, and the count of finished blocks). Each file is written to a
temp name, fsynced and renamed; ``state.json`` moves on only after the block and its outputs are in.
After a crash (even ``kill -9``) the same call resumes at the first unfinished block: activations are
read back exactly as saved and everything else is deterministic, so the result is bitwise identical
to an uninterrupted run. A fingerprint mismatch (other data, config or source) restarts from block 0.

The output is a normal lowbit checkpoint (``lowbit.load``), written atomically (``atomic_dir``):
``model.safetensors`` is assembled from the staged files by copying bytes, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.fsio import atomic_dir, atomic_write_text
from lowbit.core.heap import trim_heap
from lowbit.export.checkpoint import FORMAT_NAME, WEIGHTS, dedupe_state, is_checkpoint, write_quant_config
from lowbit.export.validate import safetensors_header
from lowbit.nn.modules import QuantizedWeightModule
from lowbit.transforms.basis import to_tensors as basis_tensors
from lowbit.transforms.block import BlockResult
from lowbit.transforms.comm import SOLO, Comm
from lowbit.transforms.configs import QuantConfig
from lowbit.transforms.source import HEAD, Source, embedding_fqn, embedding_rows, in_head, materialise
from lowbit.transforms.swap import Rows

STAGE_SUFFIX = ".lowbit-partial"
STAGE_VERSION = 1
# what a staged block's metadata records of its BlockResult (the basis goes in as tensors)
RESULT_FIELDS = tuple(f.name for f in fields(BlockResult) if f.name != "basis")
TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"),
    *("added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja"),
)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2}  # else 1 byte


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """``save_file`` to a temp name beside ``path``, fsync, rename (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StagedStore:
    """The staging folder of one output (module docstring): finished blocks and the next inputs. As a
    block store (``lowbit.transforms.store.BlockStore``) it reads each block from ``source``, stages
    it when quantized, then sends it back to the meta device; ``done`` counts the staged blocks. Of the
    tensors outside the blocks, it hands the tables over a row chunk at a time (``table``) and keeps
    float tables the source holds as float32 on meta: ``write_checkpoint`` copies their bytes."""

    rest_everywhere = False  # only rank 0 rounds the layers outside the blocks, and writes

    def __init__(
        self,
        out: Path,
        fingerprint: dict,
        resume: bool,
        progress: bool,
        activations: bool,
        source: Source,
        comm: Comm = SOLO,
    ) -> None:
        """``fingerprint`` must hold ``n_blocks``; ``activations``: block inputs are staged too.
        ``comm``: the ranks of a distributed run (one folder, e.g. on one machine or a shared file
        system): rank 0 stages the blocks and the state, each rank its share of the block inputs."""
        self.dir = out.parent / f".{out.name}{STAGE_SUFFIX}"
        self.fingerprint, self.done, self.activations = fingerprint, 0, activations
        self.source, self.comm = source, comm
        if comm.rank == 0:
            self._open(resume, progress)
        comm.barrier()
        self.done = comm.first(self.done)

    def _open(self, resume: bool, progress: bool) -> None:
        """Check the staging folder (resume it, or clear it) and write its state."""
        problem = self._usable() if self.dir.exists() else None
        if self.dir.exists() and (problem or not resume):
            if resume:
                warnings.warn(f"{self.dir}: {problem}; starting over", stacklevel=4)
            shutil.rmtree(self.dir)
        if self.done and progress:
            print(f"lowbit: resuming after block {self.done - 1} (staged in {self.dir})", file=sys.stderr)
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
        self._write_state()

    def _usable(self) -> str | None:
        """Why the existing staging cannot be resumed (one line), or None (``done`` set)."""
        try:
            state = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError) as e:
            return f"unreadable state.json ({e})"
        if state.get("fingerprint") != self.fingerprint:
            return "staged work is for another source, config, selection or calibration set"
        done = int(state.get("done", 0))
        if not all(self.block_file(i).is_file() for i in range(done)):
            return "a staged block file is missing"
        if (
            self.activations
            and 0 < done < self.fingerprint["n_blocks"]
            and not all(self.hidden_file(done, r).is_file() for r in range(self.comm.world))
        ):
            return f"the staged inputs of block {done} are missing"
        self.done = done
        return None

    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def hidden_file(self, i: int, rank: int | None = None) -> Path:
        """Staged inputs of block ``i``: of rank ``rank``'s share (default this rank's) if distributed."""
        if self.comm.world == 1:
            return self.dir / f"hidden-{i:05d}.safetensors"
        return self.dir / f"hidden-{i:05d}.rank{self.comm.rank if rank is None else rank}.safetensors"

    def _write_state(self) -> None:
        state = {"version": STAGE_VERSION, "fingerprint": self.fingerprint, "done": self.done}
        atomic_write_text(self.dir / "state.json", json.dumps(state, indent=1))

    def result(self, i: int) -> BlockResult:
        """What quantizing staged block ``i`` did."""
        return BlockResult(**self.block_meta(i)["result"])

    def capturing(self, model: nn.Module) -> AbstractContextManager:
        """The embedding reads only the calibration ids' rows from the source (``embedding_rows``)."""
        return embedding_rows(model, self.source)

    def load(self, i: int, prefix: str, block: nn.Module) -> None:
        """Read block ``i``'s tensors from the source (``materialise``)."""
        materialise(block, prefix + ".", self.source)

    def release(self, i: int, block: nn.Module) -> None:
        """Send block ``i`` back to the meta device and hand its memory back to the OS."""
        block.to("meta")
        trim_heap()

    def commit(self, i: int, prefix: str, block: nn.Module, result: BlockResult, hidden: list | None) -> None:
        """Stage block ``i`` (and the inputs of block ``i + 1``), then record it as finished."""
        tensors, aliases = dedupe_state({f"{prefix}.{k}": v for k, v in block.state_dict().items()})
        tensors.update(basis_tensors(result.basis))
        entries = {
            f"{prefix}.{n}": m.config_entry()
            for n, m in block.named_modules()
            if isinstance(m, QuantizedWeightModule)
        }
        meta = {
            "entries": json.dumps(entries),
            "aliases": json.dumps(aliases),
            "result": json.dumps({k: getattr(result, k) for k in RESULT_FIELDS}),
            "basis": json.dumps(sorted(result.basis)),
        }
        if self.comm.rank == 0:
            _save_atomic(tensors, self.block_file(i), meta)
        if hidden is not None:
            _save_atomic({str(j): h for j, h in enumerate(hidden)}, self.hidden_file(i + 1))
        self.comm.barrier()  # every rank's inputs of block i + 1 are in
        self.done = i + 1
        if self.comm.rank == 0:
            self._write_state()
        self.comm.barrier()  # block i + 1 is where a rerun starts: block i's inputs can go
        self.hidden_file(i).unlink(missing_ok=True)

    def hidden(self, i: int) -> list[torch.Tensor]:
        """The staged inputs of block ``i`` (exactly as saved)."""
        path = self.hidden_file(i)
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: unreadable staged activations ({e}); re-run with resume=False"
            ) from None
        return [t[str(j)] for j in range(len(t))]

    def block_meta(self, i: int) -> dict:
        with safe_open(str(self.block_file(i)), "pt") as f:
            meta = f.metadata()
        return {k: json.loads(v) for k, v in meta.items()}

    def table(self, key: str, shape: tuple[int, int]) -> Rows:
        """Reader of rows ``start:stop`` of the source's ``key`` (``CheckpointError`` unless ``shape``)."""
        self.source.check(key, shape)
        return lambda start, stop: self.source.rows(key, start, stop)

    def load_rest(self, model: nn.Module, path: str, rounded: list[nn.Module]) -> None:
        """Read in the tensors outside the blocks still on meta, but float tables the source holds as
        float32 (copied by ``write_checkpoint``) unless in ``rounded``, and a tied LM head (the
        embedding's, ``_tie_float_head``)."""
        tied = getattr(model.config, "tie_word_embeddings", False)
        params = dict(model.named_parameters(remove_duplicate=False))
        late = [k for k, v in model.state_dict().items() if v.is_meta and not k.startswith(path + ".")]
        late = [k for k in late if not (tied and in_head(k))]
        copied = [
            k for k in late
            if k in params and all(params[k] is not m.weight for m in rounded)
            and k in self.source and self.source.dtype(k) == "F32"
        ]  # fmt: skip
        materialise(model, "", self.source, [k for k in late if k not in copied])
        if tied:
            _tie_float_head(model, self.source)


def _tie_float_head(model: nn.Module, source: Source) -> None:
    """A tied LM head still float and on meta: the embedding's float table (read whole if the
    embedding itself was quantized)."""
    head, emb = dict(model.named_modules()).get(HEAD), model.get_input_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_meta:
        return
    if isinstance(emb, QuantizedWeightModule):
        key = f"{embedding_fqn(model)}.weight"
        head.weight = nn.Parameter(source.read([key])[key].to(head.weight.dtype), requires_grad=False)
    else:
        head.weight = emb.weight


def merge_safetensors(
    parts: Sequence[Path | tuple[Path, Collection[str]]],
    out: Path,
    metadata: dict[str, str],
    chunk: int = 1 << 24,
) -> dict[str, str]:
    """Write the tensors of safetensors files ``parts`` (a path: all its tensors; ``(path, names)``:
    those) into one file ``out``, copying bytes in ``chunk``-sized pieces (memory stays at one chunk);
    returns the sha256 of each tensor's bytes, hashed as they are copied. Tensors are laid out by element
    size (largest first) then name, so each one starts aligned to its element size, as safetensors
    itself does."""
    where: dict[str, tuple[int, int, dict]] = {}
    parts = [(p, None) if isinstance(p, Path) else p for p in parts]
    for k, (p, only) in enumerate(parts):
        header, base = safetensors_header(p)
        header.pop("__metadata__", None)
        for name, info in header.items():
            if only is not None and name not in only:
                continue
            if name in where:
                raise LowbitError(f"tensor {name} is in two input files ({parts[where[name][0]][0]}, {p})")
            where[name] = (k, base, info)
    names = sorted(where, key=lambda n: (-_ITEMSIZE.get(where[n][2]["dtype"], 1), n))
    header, offset = {"__metadata__": metadata}, 0
    for n in names:
        info = where[n][2]
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[n] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    handles, digests = [open(p, "rb") for p, _ in parts], {}  # closed below
    try:
        with open(out, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for n in names:
                k, base, info = where[n]
                start, end = info["data_offsets"]
                handles[k].seek(base + start)
                h = hashlib.sha256()
                for pos in range(start, end, chunk):
                    data = handles[k].read(min(chunk, end - pos))
                    h.update(data)
                    f.write(data)
                digests[n] = h.hexdigest()
    finally:
        for h in handles:
            h.close()
    return digests


def write_checkpoint(
    model: nn.Module,
    path: str,
    stage: StagedStore,
    out: Path,
    overwrite: bool,
    config: QuantConfig,
) -> None:
    """Assemble the lowbit checkpoint ``out`` from the shell (non-block layers), the staged blocks and
    the float tables still on meta (copied from the source files; a tied head's is an alias)."""
    source = stage.source
    inside, src = path + ".", source.folder
    shell = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    copy = [k for k, v in shell.items() if v.is_meta and k in source]
    tensors, aliases = dedupe_state({k: v for k, v in shell.items() if not v.is_meta})
    aliases |= {
        k: f"{embedding_fqn(model)}.weight" for k, v in shell.items() if v.is_meta and k not in source
    }
    _save_atomic(tensors, stage.dir / "rest.safetensors")
    del tensors
    entries = {
        fqn: m.config_entry()
        for fqn, m in model.named_modules()
        if isinstance(m, QuantizedWeightModule) and not fqn.startswith(inside)
    }
    n_blocks, basis = len(model.get_submodule(path)), []
    for i in range(n_blocks):
        meta = stage.block_meta(i)
        entries.update(meta["entries"])
        aliases.update(meta["aliases"])
        basis += meta.get("basis", [])
    order = {fqn: k for k, (fqn, _) in enumerate(model.named_modules())}
    entries = dict(sorted(entries.items(), key=lambda kv: order.get(kv[0], len(order))))
    meta = {"config": config.to_dict()}
    meta |= {"modules": entries, "aliases": aliases, "identity": [], "source": None, "inputs": None}
    meta["basis"] = sorted(basis)
    parts = [stage.dir / "rest.safetensors", *(stage.block_file(i) for i in range(n_blocks))]
    parts += [
        (src / f, [k for k in copy if source.weight_map[k] == f])
        for f in {source.weight_map[k] for k in copy}
    ]
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    with atomic_dir(out, overwrite, replaceable=is_checkpoint) as tmp:
        digests = merge_safetensors(parts, tmp / WEIGHTS, {"format": FORMAT_NAME})
        write_quant_config(tmp, meta, digests)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
