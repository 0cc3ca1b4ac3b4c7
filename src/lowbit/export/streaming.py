"""``quantize_folder``: quantize a Hugging Face folder block by block, for models larger than memory.

The model is built on the meta device; only the small tensors outside the blocks (norms) are read up
front. Calibration batches run through the embeddings once (``sequential.capture``), the embedding
reading only the rows of the calibration token ids (``source.embedding_rows``); then each decoder block
in turn is read from the source safetensors (one file or an index-sharded set), quantized by
``sequential.run_blocks`` (the in-memory pipeline's loop), staged to disk and sent back to meta.
The embedding table and an untied LM head are quantized last, read and rounded a row chunk at a time
(``source.quantize_tables``, bitwise the in-memory result); tables kept float are copied byte for byte
into the output. Peak memory: one float block, the captured activations (``n * L * hidden`` float32)
and, for GPTQ, a Hessian per Linear input of the block and its rounding's temporaries; never a whole
float table. Measured on Qwen2.5-0.5B (2.5 GB fp32; vocabulary 151936 x 896, untied head), GPTQ on
16 x 512 tokens (``lowbit quantize --streaming``): peak RSS 0.93 GiB (0.99 GB), against 2.37 GB with
whole tables and 6.7 GB in memory; importing torch and transformers alone takes 0.25 GB.

Staging and the final write are ``lowbit.export.staging``: the staging folder is the block store
(``StagedStore``) that ``lowbit.transforms.sequential.run_blocks``, the one block loop, is given; after
a crash the same call resumes at the first unfinished block, bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.export.checkpoint import check_target
from lowbit.export.source import (
    HEAD,
    Source,
    embedding_fqn,
    in_head,
    map_big_allocations,
    materialise,
    quantize_tables,
    trim_heap,
)
from lowbit.export.staging import STAGE_SUFFIX, StagedStore, write_checkpoint
from lowbit.nn.modules import FLOAT_TO_Q, QuantizedWeightModule
from lowbit.transforms.configs import QuantConfig
from lowbit.transforms.mappings import architecture, blocks_path
from lowbit.transforms.quantize import Selector
from lowbit.transforms.sequential import (
    PipelineSummary,
    block_plan,
    check_calib,
    pipeline_summary,
    quantize_rest,
    rest_plan,
    run_blocks,
)

__all__ = ["STAGE_SUFFIX", "quantize_folder"]


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
    stay on meta if the source holds them as float32: ``write_checkpoint`` copies their bytes."""
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
        stage = StagedStore(out, fingerprint, resume, progress, plan.needs_data, source)
        run_blocks(model, path, plan, select, batches, stage, summary, progress)
        _finish_rest(model, path, config, select, summary, source)
        write_checkpoint(model, path, stage, out, overwrite, config)
    except OSError as e:
        raise LowbitError(
            f"cannot write {out} or its staging {stage_dir}: {e.strerror or e}; any previous {out} is "
            "unchanged and finished blocks stay staged: fix the cause and run again to resume"
        ) from e
    shutil.rmtree(stage.dir, ignore_errors=True)
    return summary
