"""End-to-end jobs the CLI and the demo run: load a model reference, quantize and save, evaluate, compare.

A model reference is a lowbit checkpoint folder (has quant_config.json), a bundled model name
(``smollm2-135m``), a local Hugging Face folder or a ``.gguf`` file.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.export.checkpoint import QUANT_CONFIG, check_target, load, save
from lowbit.export.peers import is_peer
from lowbit.transforms import Int8Dynamic, SmoothQuant, StaticW8A8, WeightOnly, parse_scheme, quantize_
from lowbit.transforms.comm import SOLO
from lowbit.transforms.quantize import check_distributed

CALIB_SOURCES = ("photos", "mnist", "fashion-mnist", "sentences", "wiki")


def load_any(ref: str | os.PathLike, progress: bool = True, verify: bool = True) -> tuple[nn.Module, object]:
    """(model, tokenizer) for any model reference (see module docstring). ``verify``: check a lowbit
    checkpoint's sha256 checksums (``lowbit.load``)."""
    from lowbit import models

    path = Path(ref)
    if (path / QUANT_CONFIG).is_file() or is_peer(path):  # lowbit's or another tool's (GPTQ, AWQ)
        from transformers import AutoTokenizer

        tokenizer = (
            AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            if (path / "tokenizer_config.json").is_file()
            else None
        )
        return load(path, verify=verify), tokenizer
    return models.load(str(ref), progress=progress)


def _calib_source(spec: str) -> tuple[str, int, int | None]:
    """``(source, N, L)`` of ``SOURCE:N`` (L None) or ``wiki:NxL``; ``("user", 0, None)`` for the user's
    own files (``lowbit.data.user``, checked); ``LowbitError`` otherwise."""
    from lowbit.data import user

    if user.is_user_spec(spec):
        user.parse(spec)
        return "user", 0, None
    source, _, count = spec.partition(":")
    n, _, length = count.partition("x") if source == "wiki" else (count, "", "")
    ok = source in CALIB_SOURCES and n.isdigit() and int(n) >= 1
    ok = ok and (length.isdigit() and int(length) >= 2 if source == "wiki" else not length)
    if not ok:
        raise LowbitError(
            f"bad --calib {spec!r}; expected wiki:NxL (N samples of L tokens) or SOURCE:N with SOURCE in "
            f"{', '.join(CALIB_SOURCES[:-1])}"
        )
    return source, int(n), int(length) if length else None


def calibration_batches(
    spec: str, tokenizer=None, batch_size: int = 32, model: nn.Module | None = None
) -> list:
    """Batches for ``--calib SOURCE:N`` (N samples): ``photos`` (scikit-image crops, 224x224),
    ``mnist`` / ``fashion-mnist`` (training images), ``sentences`` (Lee corpus, tokenized, max 128 tokens);
    ``wiki:NxL``: N LongTensors (1, L) from the Wikipedia calibration text (``calib_batches``; fewer,
    with a warning, if the text is shorter). Every source is disjoint from the data lowbit evaluates on.
    The user's own files (``text:``, ``jsonl:``, ``images:``, ``tensors:``; ``lowbit.data.user``) are read
    for ``model`` (images: its input size and normalisation)."""
    source, n, length = _calib_source(spec)
    if source == "user":
        from lowbit.data.user import calibration
        from lowbit.models.vision import preprocess_of

        return calibration(spec, tokenizer, None if model is None else preprocess_of(model), batch_size)
    if source == "wiki":
        from lowbit.data import calib_batches

        if tokenizer is None:
            raise LowbitError("--calib wiki:NxL needs a model with a tokenizer")
        return calib_batches(tokenizer, n, length)
    if source == "sentences":
        from lowbit.data.text_pairs import sentences

        if tokenizer is None:
            raise LowbitError("--calib sentences:N needs a model with a tokenizer")
        texts = sentences("calib", n)
        return [
            dict(tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)
        ]  # fmt: skip
    from lowbit.data import vision

    if source == "photos":
        images = vision.photo_crops("calib", n)
    else:
        images = vision.DATASETS[source]("train")[0][:n]
    return list(images.split(batch_size))


def quantize_and_save(
    ref: str,
    scheme: str,
    out: str | os.PathLike,
    *,
    method: str | None = None,
    include=(),
    exclude=(),
    calib: str | None = None,
    observer: str | None = None,
    streaming: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    distributed: bool = False,
    train: dict | None = None,
) -> dict:
    """Quantize model ``ref`` with ``scheme`` (e.g. ``w4g128``, or ``w8a8-static`` with ``calib`` such
    as ``photos:512`` and an ``observer``) by ``method`` (``gptq`` with ``calib`` ``wiki:128x512``...)
    and save it to ``out``; returns stats. ``streaming``: read, quantize and stage one decoder block at
    a time from the model's safetensors folder (``lowbit.export.streaming``; resumable).
    ``distributed``: this process is one rank of a ``torchrun`` launch (``_quantize_distributed``).
    ``method="qat"``: quantization-aware training (``lowbit.training``; scheme ``w4a4``, ``wta8``...,
    ``calib`` the training data); ``train``: ``lowbit.qat.TrainOptions`` fields (steps, lr) and
    ``batch_size``. With ``calib`` ``wiki:NxL`` and a weight-only scheme (w3g64), ``method="qat"`` is
    block-wise training of a decoder instead (``WeightOnly(method="qat")``; ``train``: lr, batch_size,
    epochs; streaming allowed)."""
    if method == "qat" and (calib or "").startswith("wiki:") and _weight_only(scheme):
        if distributed or observer:
            raise LowbitError("--method qat on a language model takes neither --distributed nor --observer")
        options = _block_training(train)
        return _quantize_and_save(ref, scheme, out, method, include, exclude, calib, observer, streaming,
                                  overwrite, progress, options=options)  # fmt: skip
    if method == "qat":
        if distributed or streaming or observer:
            raise LowbitError("--method qat takes none of --distributed, --streaming, --observer")
        return _train_and_save(ref, scheme, out, calib, (include, exclude), overwrite, progress, train)
    if distributed:
        args = {"ref": str(ref), "scheme": scheme, "out": str(out), "method": method, "calib": calib}
        args |= {"include": list(include), "exclude": list(exclude), "observer": observer}
        args |= {"streaming": streaming, "overwrite": overwrite}
        return _quantize_distributed(args, progress)
    return _quantize_and_save(ref, scheme, out, method, include, exclude, calib, observer, streaming,
                              overwrite, progress)  # fmt: skip


def _weight_only(scheme: str) -> bool:
    """Whether ``scheme`` names a ``WeightOnly`` config (w3g64...; not w4a4, w8a8)."""
    try:
        return isinstance(parse_scheme(scheme), WeightOnly)
    except LowbitError:
        return False


def _block_training(train: dict | None) -> dict:
    """``WeightOnly`` fields of the CLI's training options for block-wise QAT of a decoder."""
    train = {k: v for k, v in (train or {}).items() if v is not None}
    if "steps" in train:
        raise LowbitError(
            "--steps applies to vision models; block-wise training of a language model takes --epochs"
        )
    names = {"lr": "train_lr", "batch_size": "train_batch", "epochs": "train_epochs"}
    return {names[k]: v for k, v in train.items()}


def _train_and_save(ref, scheme, out, calib, selection, overwrite, progress, train: dict | None) -> dict:
    from lowbit import training
    from lowbit.qat import TrainOptions, parse_qat_scheme

    config = parse_qat_scheme(scheme)
    if calib is None:
        raise LowbitError(
            "--method qat needs training data, e.g. --calib fashion-mnist:60000 or photos:512 (vision "
            "models) or wiki:64x512 (block-wise training of a language model)"
        )
    source, n, _ = _calib_source(calib)
    if source == "user":
        raise LowbitError("--method qat trains on the bundled data sets (mnist:N, fashion-mnist:N, photos:N)")
    train = {k: v for k, v in (train or {}).items() if v is not None}
    if train.pop("epochs", None) is not None:
        raise LowbitError("--epochs applies to block-wise training of a language model (--calib wiki:NxL)")
    batch_size = train.pop("batch_size", None) or 128
    options = TrainOptions(**{k: v for k, v in train.items() if v is not None})
    out = check_target(out, overwrite)
    data = training.training_set(source, n)
    model, tok = load_any(ref, progress)
    training.check_trainable(model, tok, ref)
    stats = training.train_and_save(model, config, out, data, options, batch_size=batch_size,
                                    selection=selection, overwrite=overwrite, progress=progress)  # fmt: skip
    return {"model": str(ref), "scheme": scheme, "method": "qat", "out": str(out), **stats}


def _quantize_distributed(args: dict, progress: bool) -> dict:
    """``quantize_and_save`` as one rank of a torchrun launch: the ranks check they got the same
    arguments, share the calibration forwards and the rounding of each block, and rank 0 writes
    (``lowbit.transforms.comm``). Returns this rank's result with ``rank``, ``ranks`` and, per rank,
    ``peak_rss_kib`` (``ru_maxrss``) and ``collective_bytes`` (sent plus received)."""
    import torch.distributed as dist

    from lowbit.transforms.comm import torchrun_comm

    comm = torchrun_comm()
    try:
        comm.agree({"lowbit quantize": args})
        ref, scheme, out = args.pop("ref"), args.pop("scheme"), args.pop("out")
        result = _quantize_and_save(ref, scheme, out, **args, progress=progress, comm=comm)
        result |= {"ranks": comm.world, "rank": comm.rank}
        result["peak_rss_kib"] = comm.counts(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        result["collective_bytes"] = comm.counts(sum(comm.volume().values()))  # sent + received
        dist.barrier()  # no rank tears down its connections while another finishes the last collective
    finally:
        dist.destroy_process_group()
    return result


def _quantize_and_save(
    ref, scheme, out, method, include, exclude, calib, observer, streaming, overwrite, progress, comm=SOLO,
    options: dict | None = None,
) -> dict:  # fmt: skip
    config = parse_scheme(scheme, method)
    if options:  # config fields (block-wise QAT's train_*)
        config = replace(config, **options)
    if observer is not None:
        if not isinstance(config, StaticW8A8):
            raise LowbitError("--observer applies to static schemes (w8a8-static) only")
        config = replace(config, observer=observer)
    if calib is not None:
        _calib_source(calib)  # bad spec: error before loading anything
        if not config.needs_calib:
            warnings.warn(
                f"--calib is ignored: {scheme} with method {method or 'rtn'} uses no data", stacklevel=2
            )
            calib = None
    elif config.needs_calib:
        raise LowbitError(
            f"{scheme} with method {method or 'rtn'} needs calibration data, e.g. --calib wiki:128x512 "
            "(language models) or photos:512"
        )
    if comm.world > 1:
        check_distributed(config)  # before loading anything
    if streaming and not isinstance(config, (WeightOnly, SmoothQuant, Int8Dynamic)):
        raise LowbitError("--streaming supports weight-only schemes, w8a8 and --method smoothquant")
    out = check_target(out, overwrite)
    rank = comm.rank
    if streaming:  # quantize_seconds: the whole streaming run (reading, quantizing, writing)
        summary, seconds = _quantize_streaming(
            ref, config, out, calib, include, exclude, overwrite, progress and rank == 0, comm
        )
    else:
        model, tok = load_any(ref, progress and rank == 0)
        batches = calibration_batches(calib, tok, model=model) if calib else None
        t0 = time.perf_counter()
        summary = quantize_(
            model, config, batches, include=include, exclude=exclude, progress=progress, comm=comm
        )
        seconds = time.perf_counter() - t0
        if rank == 0:
            save(model, out, tokenizer=tok, overwrite=overwrite)
        comm.barrier()
    from lowbit.eval.size import dir_bytes

    return {
        "model": str(ref),
        "scheme": scheme,
        "method": method or "rtn",
        "out": str(out),
        "quantized_modules": len(summary.quantized),
        "tied": summary.tied,
        "kept_float": summary.skipped,
        "uncalibrated": getattr(summary, "uncalibrated", {}),
        "compute_dtype": getattr(summary, "compute_dtype", None),
        **({"trained": summary.trained} if getattr(summary, "trained", None) else {}),
        "folded_batchnorm": len(summary.folded),
        "float_ops": summary.float_ops,
        "quantize_seconds": round(seconds, 2),
        "bytes_on_disk": dir_bytes(out / "model.safetensors"),
    }


def _quantize_streaming(ref, config, out, calib, include, exclude, overwrite, progress, comm):
    """(summary, seconds) of ``quantize_folder`` on the fp32 Hugging Face folder of ``ref``."""
    from lowbit import models
    from lowbit.export.streaming import quantize_folder

    if (Path(ref) / QUANT_CONFIG).is_file():
        raise LowbitError(f"{ref} is a lowbit checkpoint; --streaming reads a float model")
    folder = models.cached_folder(ref, progress=progress)
    tok = None
    if calib and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    batches = calibration_batches(calib, tok) if calib else None
    del tok  # 0.13 GB for Qwen2.5's vocabulary, not needed while quantizing
    t0 = time.perf_counter()
    opts = {"include": include, "exclude": exclude, "overwrite": overwrite, "progress": progress}
    summary = quantize_folder(folder, config, out, batches, **opts, comm=comm)
    return summary, time.perf_counter() - t0


@dataclass
class SchemeRow:
    scheme: str
    size_mb: float
    compression: float
    ppl: float
    ppl_change_pct: float
    seconds: float


def compare_schemes(
    ref: str,
    schemes: list[str],
    out_root: str | os.PathLike,
    *,
    n_tokens: int = 8192,
    window: int = 512,
    progress: bool = True,
) -> list[SchemeRow]:
    """fp32 baseline and each scheme: size on disk, compression, perplexity, change, time.

    Each quantized model is saved under ``out_root/<scheme>`` and evaluated after being loaded back,
    so the numbers are those of the checkpoint a user would ship.
    """
    from lowbit.data import eval_tokens
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.size import dir_bytes, fp32_checkpoint_bytes

    t0 = time.perf_counter()
    model, tok = load_any(ref, progress)
    tokens = eval_tokens(tok, n_tokens)
    fp32_bytes = fp32_checkpoint_bytes(model)
    base = perplexity(model, tokens, window=window, progress=progress)
    rows = [SchemeRow("fp32", fp32_bytes / 1e6, 1.0, base, 0.0, time.perf_counter() - t0)]
    for scheme in schemes:
        t0 = time.perf_counter()
        out = Path(out_root) / scheme
        quantize_and_save(ref, scheme, out, overwrite=True, progress=progress)
        q_model, _ = load_any(out)
        ppl = perplexity(q_model, tokens, window=window, progress=progress)
        size = dir_bytes(out / "model.safetensors")
        rows.append(
            SchemeRow(
                scheme, size / 1e6, fp32_bytes / size, ppl, 100 * (ppl / base - 1), time.perf_counter() - t0
            )
        )
    return rows


def format_rows(rows: list[SchemeRow]) -> str:
    """Markdown table of ``compare_schemes`` rows."""
    head = "| scheme | size (MB) | vs fp32 | perplexity | change | time (s) |\n|---|---:|---:|---:|---:|---:|"
    body = [
        f"| {r.scheme} | {r.size_mb:.1f} | {r.compression:.2f}x | {r.ppl:.2f} | {r.ppl_change_pct:+.1f}% "
        f"| {r.seconds:.0f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def rows_to_json(rows: list[SchemeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def _float_and_quantized(ref: str | os.PathLike, scheme: str | None, progress: bool):
    """(float model, quantized model, scheme label, tokenizer) for ``bench``: a checkpoint is timed
    against its dequantized float twin; a float model is quantized here by ``scheme``."""
    import copy

    from lowbit.kernels.advice import layer_op
    from lowbit.transforms import dequantize_

    model, tok = load_any(ref, progress)
    if any(layer_op(m) is not None for m in model.modules()):
        if scheme is not None:
            raise LowbitError(f"{ref} is already quantized; drop --scheme (it is timed as saved)")
        twin = copy.deepcopy(model)
        dequantize_(twin)
        return twin, model, "checkpoint", tok
    scheme = scheme or "w4g128"
    q = copy.deepcopy(model)
    quantize_(q, parse_scheme(scheme))
    return model, q, scheme, tok


def bench(
    ref: str | os.PathLike,
    scheme: str | None = None,
    *,
    batches=(1, 4, 16, 64),
    prompt: int = 128,
    new: int = 32,
    rounds: int = 3,
    layers: bool = True,
    advice: bool = False,
    progress: bool = True,
    decoder: str = "fast",
    dot: str = "float",
) -> dict:
    """Float and quantized side by side: per-layer latency by backend and batch, end-to-end tokens/s
    and memory (``lowbit.eval.bench``). ``advice``: route layers by this machine's cached advice;
    ``decoder``/``dot``: the generation path (``lowbit.eval.bench.end_to_end``)."""
    import torch

    from lowbit.eval import bench as eb
    from lowbit.kernels.advice import apply_advice, load_cached

    if prompt < 1 or new < 2:
        raise LowbitError(f"--prompt must be >= 1 and --new >= 2 (got {prompt}, {new})")
    fmodel, qmodel, label, tok = _float_and_quantized(ref, scheme, progress)
    routed = apply_advice(qmodel, load_cached()) if advice else 0
    out: dict = {"model": str(ref), "scheme": label, "machine": eb.machine_info(), "routed_layers": routed}
    if layers:
        out["layers"] = eb.layer_report(qmodel, batches, rounds=max(rounds, 3))
    if hasattr(qmodel, "generate"):
        if tok is not None:
            from lowbit.data import eval_tokens

            ids = eval_tokens(tok, prompt)[None, :]
        else:
            ids = torch.randint(
                0, qmodel.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)
            )
        pair = {"fp32": fmodel, "quantized": qmodel}
        out["end_to_end"] = eb.end_to_end(pair, ids, new=new, rounds=rounds, decoder=decoder, dot=dot)
        out["end_to_end_setup"] = {
            "batch": 1,
            "prompt_tokens": prompt,
            "new_tokens": new,
            "rounds": rounds,
            "dot": dot,
        }
    out["markdown"] = eb.format_report(out)
    return out


def advise(
    ref: str | os.PathLike,
    schemes=("w8", "w4g128", "w8a8"),
    *,
    batches=(1, 4, 16, 64),
    refresh: bool = False,
    rounds: int = 3,
    progress: bool = True,
) -> dict:
    """Measure (and cache) the fastest scheme and backend per Linear shape of ``ref`` and batch size."""
    from lowbit.eval import advise as ea
    from lowbit.kernels.advice import cache_path

    for s in schemes:
        parse_scheme(s)  # bad scheme: error before any measuring
    model, _ = load_any(ref, progress)
    shapes = ea.linear_shapes(model)
    if not shapes:
        raise LowbitError(f"{ref} has no Linear layer to advise on")
    adv = ea.advise(shapes, schemes, batches, refresh=refresh, progress=progress, rounds=rounds)
    rows = ea.table(adv, shapes, schemes)
    return {
        "model": str(ref),
        "cache": str(cache_path()),
        "table": rows,
        "markdown": ea.format_table(rows, schemes),
    }
