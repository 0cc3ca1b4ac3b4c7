"""``quantize_folder``: quantize a Hugging Face folder block by block, for models larger than memory.

This module builds the model and writes the output; the quantization is the in-memory pipeline's
(``lowbit.transforms.sequential.run_pipeline``), given a store that reads from the source folder
(``lowbit.transforms.source``) and stages to disk (``lowbit.export.staging.StagedStore``).

The model is built on the meta device; only the small tensors outside the blocks (norms) are read up
front. Calibration batches run through the embeddings once (``sequential.capture``), the embedding
reading only the rows of the calibration token ids (``source.embedding_rows``); then each decoder block
in turn is read from the source safetensors (one file or an index-sharded set), quantized by
``sequential.run_blocks`` (the one block loop), staged to disk and sent back to meta.
The embedding table and an untied LM head are quantized last (``sequential.quantize_rest``), read and
rounded a row chunk at a time (``swap.quantize_tables``, bitwise the in-memory result); tables kept
float are copied byte for byte into the output. Peak memory: one float block, the captured activations
(``n * L * hidden`` float32) and, for GPTQ, a Hessian per Linear input of the block and its rounding's
temporaries; never a whole float table.

Staging and the final write are ``lowbit.export.staging``: after a crash the same call resumes at the
first unfinished block, bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.core.heap import map_big_allocations, trim_heap
from lowbit.export.checkpoint import check_target
from lowbit.export.staging import STAGE_SUFFIX, StagedStore, write_checkpoint
from lowbit.transforms.comm import SOLO, Comm, digest_batches
from lowbit.transforms.configs import QuantConfig, WeightOnly
from lowbit.transforms.mappings import architecture, blocks_path
from lowbit.transforms.quantize import Selector
from lowbit.transforms.sequential import (
    PipelineSummary,
    block_plan,
    check_calib,
    pipeline_summary,
    run_pipeline,
)
from lowbit.transforms.source import HEAD, Source, embedding_fqn, materialise
from lowbit.transforms.weight_only import check_layers

__all__ = ["STAGE_SUFFIX", "quantize_folder"]


def _skeleton(folder: Path, source: Source) -> tuple[nn.Module, str]:
    """(meta-device model of ``folder`` with the norms... read in, blocks path). The blocks stay on
    meta (the store reads one at a time), the embedding table and LM head weight too (the pipeline
    reads them a row chunk at a time); a tied head shares the embedding's meta weight."""
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
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, path


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
    comm: Comm = SOLO,
) -> PipelineSummary:
    """Quantize the Hugging Face model in folder ``src`` (config.json + safetensors) with ``config``
    (``WeightOnly`` with any method, ``SmoothQuant``, ``Int8Dynamic``) into lowbit checkpoint ``out``,
    block by block (module docstring: memory, staging, resume). Sets glibc's mmap threshold for the
    process (``lowbit.core.heap.map_big_allocations``).

    ``calib``: calibration batches (e.g. ``lowbit.data.calib_batches(tok, 128, 512)``) for methods that
    need data. ``include``/``exclude``: module-name patterns (``Selector``). ``resume``: continue staged
    work of an interrupted run with the same inputs (False: start over). ``overwrite``: replace an
    existing ``out``. Tokenizer files are copied from ``src``. Returns what was quantized.
    ``comm``: the ranks of a distributed run (``lowbit.transforms.comm.TorchComm``), each making the
    same call: they are checked to agree, share the calibration forwards and the rounding of each
    block, and rank 0 writes; staging resumes with the same number of ranks.
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
    if isinstance(config, WeightOnly):
        check_layers(model, config, select, by_blocks=True)  # per-layer formats name layers it has
    summary = pipeline_summary(config, plan, model)
    fingerprint = {"config": config.to_dict(), "include": list(include), "exclude": list(exclude)}
    fingerprint |= {"source": source.stamp(), "calib": digest_batches(batches) if plan.needs_data else None}
    fingerprint |= {"n_blocks": len(model.get_submodule(path)), "torch": torch.__version__}
    fingerprint |= {"compute_dtype": summary.compute_dtype}  # "auto" resolves per machine
    fingerprint |= {"ranks": comm.world} if comm.world > 1 else {}
    comm.agree({**fingerprint, "out": str(out), "resume": resume, "overwrite": overwrite})
    stage_dir = out.parent / f".{out.name}{STAGE_SUFFIX}"
    try:
        stage = StagedStore(
            out, fingerprint, resume, progress and comm.rank == 0, plan.needs_data, source, comm
        )
        run_pipeline(model, path, config, select, batches, stage, summary, progress, comm)
        if comm.rank == 0:
            write_checkpoint(model, path, stage, out, overwrite, config)
        comm.barrier()
    except OSError as e:
        raise LowbitError(
            f"cannot write {out} or its staging {stage_dir}: {e.strerror or e}; any previous {out} is "
            "unchanged and finished blocks stay staged: fix the cause and run again to resume"
        ) from e
    if comm.rank == 0:
        shutil.rmtree(stage.dir, ignore_errors=True)
    return summary
