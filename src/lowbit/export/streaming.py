"""``quantize_folder``: quantize a Hugging Face folder block by block, for models larger than memory.

The model is built on the meta device; only the small tensors outside the blocks (norms) are read up
front. Calibration batches run through the embeddings once (``sequential.capture``), the embedding
reading only the rows of the calibration token ids (``source.embedding_rows``); then each decoder block
in turn is read from the source safetensors (one file or an index-sharded set), quantized by
``sequential.quantize_block`` (the in-memory pipeline's code), staged to disk and sent back to meta.
The embedding table and an untied LM head are quantized last, read and rounded a row chunk at a time
(``source.quantize_tables``, bitwise the in-memory result); tables kept float are copied byte for byte
into the output. Peak memory: one float block, the captured activations (``n * L * hidden`` float32)
and, for GPTQ, a Hessian per Linear input of the block and its rounding's temporaries; never a whole
float table. Measured on Qwen2.5-0.5B (2.5 GB fp32; vocabulary 151936 x 896, untied head), GPTQ on
16 x 512 tokens (``lowbit quantize --streaming``): peak RSS 0.93 GiB (0.99 GB), against 2.37 GB with
whole tables and 6.7 GB in memory; importing torch and transformers alone takes 0.25 GB.

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
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.fsio import atomic_dir, atomic_write_text
from lowbit.export.checkpoint import (
    FORMAT_NAME,
    WEIGHTS,
    _dedupe,
    check_target,
    is_checkpoint,
    write_quant_config,
)
from lowbit.export.source import (
    HEAD,
    Source,
    embedding_fqn,
    embedding_rows,
    in_head,
    map_big_allocations,
    materialise,
    quantize_tables,
    trim_heap,
)
from lowbit.nn.modules import FLOAT_TO_Q, QuantizedWeightModule
from lowbit.transforms.configs import QuantConfig
from lowbit.transforms.mappings import architecture, blocks_path
from lowbit.transforms.quantize import Selector
from lowbit.transforms.sequential import (
    BlockResult,
    PipelineSummary,
    block_plan,
    capture,
    check_calib,
    merge,
    pipeline_summary,
    quantize_block,
    quantize_rest,
    rest_plan,
)

STAGE_SUFFIX = ".lowbit-partial"
STAGE_VERSION = 1
TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"),
    *("added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja"),
)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2}  # else 1 byte


def _skeleton(folder: Path, source: Source) -> tuple[nn.Module, str]:
    """(meta-device model of ``folder`` with the norms... read in, blocks path). The blocks stay on
    meta (``materialise`` one at a time), the embedding table and LM head weight too (``source``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    arch = architecture(cfg)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = blocks_path(model, arch)
    tables = {f"{embedding_fqn(model)}.weight", f"{HEAD}.weight"}
    materialise(
        model, "", source, [k for k in model.state_dict() if not k.startswith(path + ".") and k not in tables]
    )
    return model, path


def _finish_rest(model: nn.Module, path: str, config, select, summary, source: Source) -> None:
    """Quantize what lies outside the blocks: the embedding table and LM head a row chunk at a time
    from the source (``quantize_tables``); tables it leaves (per-tensor specs) are read whole and
    rounded by ``quantize_rest``. A tied head shares the embedding's quantized copy. Tables kept float
    stay on meta if the source holds them as float32: ``_write_output`` copies their bytes."""
    outside = lambda fqn: select(fqn) and not fqn.startswith(path + ".")  # noqa: E731
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    plan, quantize = rest_plan(config)
    tables = [n for n in (embedding_fqn(model), HEAD) if n in dict(model.named_modules())]
    quantize_tables(model, tables, plan, quantize, outside, summary, source)
    to_round = [m for n, m in model.named_modules() if type(m) in FLOAT_TO_Q and outside(n) and plan(m)]
    params = dict(model.named_parameters(remove_duplicate=False))
    late = [k for k, v in model.state_dict().items() if v.is_meta and not k.startswith(path + ".")]
    late = [k for k in late if not (tied and in_head(k))]  # the embedding's (``_tie_float_head``)
    copied = [
        k for k in late
        if k in params and all(params[k] is not m.weight for m in to_round)
        and k in source and source.dtype(k) == "F32"
    ]  # fmt: skip
    materialise(model, "", source, [k for k in late if k not in copied])
    _tie_float_head(model, tied, source)
    quantize_rest(model, config, outside, summary)


def _tie_float_head(model: nn.Module, tied: bool, source: Source) -> None:
    """A tied LM head still float and on meta: the embedding's float table (read whole if the
    embedding itself was quantized)."""
    head, emb = dict(model.named_modules()).get(HEAD), model.get_input_embeddings()
    if not tied or type(head) is not nn.Linear or not head.weight.is_meta:
        return
    if isinstance(emb, QuantizedWeightModule):
        key = f"{embedding_fqn(model)}.weight"
        head.weight = nn.Parameter(source.read([key])[key].to(head.weight.dtype), requires_grad=False)
    else:
        head.weight = emb.weight


def _digest(batches: Sequence) -> str:
    """sha256 over the calibration batches' tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()

    def add(key: str, v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v):
                add(f"{key}.{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                add(f"{key}.{i}", x)
        else:
            h.update(f"{key}={v!r}".encode())

    add("calib", list(batches))
    return h.hexdigest()


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


class _Stage:
    """The staging folder of one output (module docstring): finished blocks and the next inputs."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool, progress: bool, activations: bool) -> None:
        """``fingerprint`` must hold ``n_blocks``; ``activations``: block inputs are staged too."""
        self.dir = out.parent / f".{out.name}{STAGE_SUFFIX}"
        self.fingerprint, self.done, self.activations = fingerprint, 0, activations
        problem = self._usable() if self.dir.exists() else None
        if self.dir.exists() and (problem or not resume):
            if resume:
                warnings.warn(f"{self.dir}: {problem}; starting over", stacklevel=3)
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
            and not self.hidden_file(done).is_file()
        ):
            return f"the staged inputs of block {done} are missing"
        self.done = done
        return None

    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def hidden_file(self, i: int) -> Path:
        return self.dir / f"hidden-{i:05d}.safetensors"

    def _write_state(self) -> None:
        state = {"version": STAGE_VERSION, "fingerprint": self.fingerprint, "done": self.done}
        atomic_write_text(self.dir / "state.json", json.dumps(state, indent=1))

    def commit(self, i: int, prefix: str, block: nn.Module, res: BlockResult, hidden: list | None) -> None:
        """Stage block ``i`` (and the inputs of block ``i + 1``), then record it as finished."""
        tensors, aliases = _dedupe({f"{prefix}.{k}": v for k, v in block.state_dict().items()})
        entries = {
            f"{prefix}.{n}": m.config_entry()
            for n, m in block.named_modules()
            if isinstance(m, QuantizedWeightModule)
        }
        meta = {
            "entries": json.dumps(entries),
            "aliases": json.dumps(aliases),
            "result": json.dumps(asdict(res)),
        }
        _save_atomic(tensors, self.block_file(i), meta)
        if hidden is not None:
            _save_atomic({str(j): h for j, h in enumerate(hidden)}, self.hidden_file(i + 1))
        self.done = i + 1
        self._write_state()
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


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def merge_safetensors(
    parts: Sequence[Path | tuple[Path, Collection[str]]],
    out: Path,
    metadata: dict[str, str],
    chunk: int = 1 << 24,
) -> None:
    """Write the tensors of safetensors files ``parts`` (a path: all its tensors; ``(path, names)``:
    those) into one file ``out``, copying bytes in ``chunk``-sized pieces (memory stays at one chunk).
    Tensors are laid out by element size (largest first) then name, so each one starts aligned to its
    element size, as safetensors itself does."""
    where: dict[str, tuple[int, int, dict]] = {}
    parts = [(p, None) if isinstance(p, Path) else p for p in parts]
    for k, (p, only) in enumerate(parts):
        header, base = _read_header(p)
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
    handles = [open(p, "rb") for p, _ in parts]  # closed below
    try:
        with open(out, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for n in names:
                k, base, info = where[n]
                start, end = info["data_offsets"]
                handles[k].seek(base + start)
                for pos in range(start, end, chunk):
                    f.write(handles[k].read(min(chunk, end - pos)))
    finally:
        for h in handles:
            h.close()


def _write_output(
    model: nn.Module,
    path: str,
    stage: _Stage,
    out: Path,
    overwrite: bool,
    config: QuantConfig,
    source: Source,
) -> None:
    """Assemble the lowbit checkpoint ``out`` from the shell (non-block layers), the staged blocks and
    the float tables still on meta (copied from the source files; a tied head's is an alias)."""
    inside, src = path + ".", source.folder
    shell = {k: v for k, v in model.state_dict().items() if not k.startswith(inside)}
    copy = [k for k, v in shell.items() if v.is_meta and k in source]
    tensors, aliases = _dedupe({k: v for k, v in shell.items() if not v.is_meta})
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
    n_blocks = len(model.get_submodule(path))
    for i in range(n_blocks):
        meta = stage.block_meta(i)
        entries.update(meta["entries"])
        aliases.update(meta["aliases"])
    order = {fqn: k for k, (fqn, _) in enumerate(model.named_modules())}
    entries = dict(sorted(entries.items(), key=lambda kv: order.get(kv[0], len(order))))
    meta = {"config": config.to_dict()}
    meta |= {"modules": entries, "aliases": aliases, "identity": [], "source": None, "inputs": None}
    parts = [stage.dir / "rest.safetensors", *(stage.block_file(i) for i in range(n_blocks))]
    parts += [
        (src / f, [k for k in copy if source.weight_map[k] == f])
        for f in {source.weight_map[k] for k in copy}
    ]
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    with atomic_dir(out, overwrite, replaceable=is_checkpoint) as tmp:
        merge_safetensors(parts, tmp / WEIGHTS, {"format": FORMAT_NAME})
        write_quant_config(tmp, meta)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)


def _run_blocks(model, path, plan, select, batches, source, stage, summary, progress) -> None:
    """Quantize the blocks not staged yet, one at a time (materialise, quantize, stage, free)."""
    arch = architecture(model.config)
    blocks = model.get_submodule(path)
    for i in range(stage.done):
        merge(summary, BlockResult(**stage.block_meta(i)["result"]))
    if stage.done == len(blocks):
        return
    cap = None
    if plan.needs_data:
        with embedding_rows(model, source):
            cap = capture(model, path, batches)
    if cap is not None and stage.done:
        cap.hidden = stage.hidden(stage.done)
    label = f"{plan.scales}+{plan.rounding}" if plan.scales else plan.rounding
    bar = tqdm(range(stage.done, len(blocks)), desc=label, unit="block", disable=not progress)
    for i in bar:
        prefix, block, last = f"{path}.{i}", blocks[i], i + 1 == len(blocks)
        materialise(block, prefix + ".", source)
        hidden, kwargs = (cap.hidden, cap.kwargs[i]) if cap else (None, None)
        res = quantize_block(block, prefix, plan, arch, select, hidden, kwargs, propagate=not last)
        stage.commit(i, prefix, block, res, cap.hidden if cap and not last else None)
        merge(summary, res)
        block.to("meta")
        trim_heap()


def quantize_folder(
    src: str | os.PathLike,
    config: QuantConfig,
    out: str | os.PathLike,
    calib: Iterable | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> PipelineSummary:
    """Quantize the Hugging Face model in folder ``src`` (config.json + safetensors) with ``config``
    (``WeightOnly`` with any method, ``SmoothQuant``, ``Int8Dynamic``) into lowbit checkpoint ``out``,
    block by block (module docstring: memory, staging, resume). Sets glibc's mmap threshold for the
    process (``source.map_big_allocations``).

    ``calib``: calibration batches (e.g. ``lowbit.data.calib_batches(tok, 128, 512)``) for methods that
    need data. ``include``/``exclude``: module-name patterns (``Selector``). ``resume``: continue staged
    work of an interrupted run with the same inputs (False: start over). ``overwrite``: replace an
    existing ``out``. Tokenizer files are copied from ``src``. Returns what was quantized.
    """
    src, out = Path(src), check_target(out, overwrite)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: not a Hugging Face model folder (no config.json)")
    plan = block_plan(config)
    batches = check_calib(config, calib)
    map_big_allocations()
    trim_heap()  # what the caller freed (e.g. a tokenizer, 0.17 GB for Qwen2.5) leaves the heap now
    source = Source(src)
    model, path = _skeleton(src, source)
    select = Selector(include, exclude)
    summary = pipeline_summary(config, plan, model)
    fingerprint = {"config": config.to_dict(), "include": list(include), "exclude": list(exclude)}
    fingerprint |= {"source": source.stamp(), "calib": _digest(batches) if plan.needs_data else None}
    fingerprint |= {"n_blocks": len(model.get_submodule(path)), "torch": torch.__version__}
    fingerprint |= {"compute_dtype": summary.compute_dtype}  # "auto" resolves per machine
    stage_dir = out.parent / f".{out.name}{STAGE_SUFFIX}"
    try:
        stage = _Stage(out, fingerprint, resume, progress, plan.needs_data)
        _run_blocks(model, path, plan, select, batches, source, stage, summary, progress)
        _finish_rest(model, path, config, select, summary, source)
        _write_output(model, path, stage, out, overwrite, config, source)
    except OSError as e:
        raise LowbitError(
            f"cannot write {out} or its staging {stage_dir}: {e.strerror or e}; any previous {out} is "
            "unchanged and finished blocks stay staged: fix the cause and run again to resume"
        ) from e
    shutil.rmtree(stage.dir, ignore_errors=True)
    return summary
