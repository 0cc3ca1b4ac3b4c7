"""GGUF export for llama.cpp: a Llama-family checkpoint's own codes repacked into GGUF blocks.

Blocks of 32 weights along a row, each with a float16 scale ``d`` (llama.cpp's ``ggml-common.h``):

| GGUF type | lowbit scheme            | block bytes                          | value              |
|-----------|--------------------------|--------------------------------------|--------------------|
| Q8_0      | ``w8g32-sym``            | d, 32 int8 ``q``                     | ``q * d``          |
| Q4_0      | ``w4g32-sym``            | d, 16 bytes: ``q[j] + 8`` in the low | ``(n - 8) * d``    |
|           |                          | nibble of byte j, ``q[j + 16] + 8``  |                    |
|           |                          | in its high nibble                   |                    |
| Q4_1      | ``w4g32`` (asymmetric)   | d, ``m = -z * d`` (float16), nibbles | ``n * d + m``      |
|           |                          | as Q4_0 holding the codes ``n``      |                    |

Q8_0 and Q4_0 hold lowbit's values exactly (same float16 scale, same integers); Q4_1 rounds ``-z * d`` to
float16. Whatever rounding made the codes (RTN, HQQ, GPTQ, AWQ) is kept. Norms are float32; q_proj and
k_proj rows are permuted as llama.cpp's converter does for rotary embeddings. The metadata and
tokenizer are copied from the GGUF file the float model was read from (a bundled GGUF model or a
``.gguf`` path), so only such models export.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.core.codec import decode
from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_file
from lowbit.nn.modules import QuantizedWeightModule

BLOCK = 32
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(fqn: str) -> str | None:
    """The llama.cpp tensor name of a Llama module ``fqn`` (without ``.weight``), or None."""
    if fqn in ("model.embed_tokens", "lm_head", "model.norm"):
        return {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}[fqn]
    parts = fqn.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _NAMES:
        return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:])]}"
    return None


def block_type(m: QuantizedWeightModule) -> str:
    """The GGUF type holding ``m``'s codes exactly, or ``LowbitError`` saying what would."""
    spec, g = m.spec, getattr(m.spec.granularity, "size", None)
    kind = {("int8", True): "Q8_0", ("int4", True): "Q4_0", ("uint4", False): "Q4_1"}.get(
        (spec.format, spec.symmetric)
    )
    if kind is None or g != BLOCK or spec.scale_dtype != "float16":
        raise LowbitError(
            f"GGUF blocks hold 32 weights with a float16 scale: w8g32-sym (Q8_0), w4g32-sym (Q4_0) or w4g32 "
            f"(Q4_1); this layer is {spec.format} {'sym' if spec.symmetric else 'asym'} group {g}"
        )
    return kind


def _nibbles(n: np.ndarray) -> np.ndarray:
    """uint8 ``(rows, blocks, 16)``: codes ``n (rows, blocks, 32)`` in 0..15, llama.cpp's nibble order."""
    return (n[..., :16] | (n[..., 16:] << 4)).astype(np.uint8)


def pack(m: QuantizedWeightModule, kind: str, rows: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``(rows, cols // 32 * block bytes)``: ``m``'s codes as GGUF blocks of ``kind``; ``rows``:
    an optional row order (the rotary permutation)."""
    codes = decode(m.qweight, m.spec.fmt, m.cols).numpy().astype(np.int16)
    d = m.scale.detach().to(torch.float16).numpy()
    if rows is not None:
        codes, d = codes[rows], d[rows]
    r, blocks = d.shape
    q = codes.reshape(r, blocks, BLOCK)
    head = d.reshape(r, blocks, 1).view(np.uint8)  # float16 bytes, little-endian
    if kind == "Q8_0":
        body = q.astype(np.int8).view(np.uint8)
    elif kind == "Q4_0":
        body = _nibbles((q + 8).astype(np.uint8))
    else:
        z = m.zero_point.detach().numpy().astype(np.float32)
        z = z[rows] if rows is not None else z
        mins = (-z * d.astype(np.float32)).astype(np.float16).reshape(r, blocks, 1).view(np.uint8)
        head = np.concatenate([head, mins], axis=2)
        body = _nibbles(q.astype(np.uint8))
    return np.concatenate([head, body], axis=2).reshape(r, -1)


def rotary_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's q/k permutation: rows of each head's two rotary halves interleaved."""
    idx = np.arange(n_rows).reshape(heads, 2, n_rows // heads // 2)
    return idx.swapaxes(1, 2).reshape(-1)


def _tensors(model: nn.Module) -> list[tuple[str, np.ndarray, str | None]]:
    """(GGUF name, data, GGUF type or None for float32) of every exported tensor."""
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    out = []
    for fqn, m in model.named_modules():
        name = gguf_name(fqn)
        if name is None or (tied and fqn == "lm_head"):
            continue
        if isinstance(m, QuantizedWeightModule):
            rows = None
            if fqn.endswith(("q_proj", "k_proj")):
                heads = cfg.num_attention_heads if fqn.endswith("q_proj") else cfg.num_key_value_heads
                rows = rotary_rows(m.rows, heads)
            kind = block_type(m)
            out.append((f"{name}.weight", pack(m, kind, rows), kind))
        elif isinstance(m, nn.Module) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            out.append((f"{name}.weight", m.weight.detach().float().numpy(), None))
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            raise LowbitError(f"{fqn} is float: GGUF export takes a model with every Linear quantized")
    return out


def export_gguf(model: nn.Module, source_gguf: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write ``model`` (a quantized Llama-family decoder) as GGUF ``out`` (atomically), with the metadata
    and tokenizer of ``source_gguf``; returns {"out", "tensors", "types", "bytes"}."""
    import gguf

    if getattr(getattr(model, "config", None), "model_type", None) not in ("llama",):
        raise LowbitError("GGUF export covers Llama-family decoders (model_type llama)")
    reader = gguf.GGUFReader(str(source_gguf))
    tensors = _tensors(model)
    counts = Counter(k for _, _, k in tensors if k)
    kinds = sorted(counts)
    writer = gguf.GGUFWriter(None, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(FILE_TYPES[counts.most_common(1)[0][0]] if counts else 0)  # the main type
    for name, data, kind in tensors:
        raw = getattr(gguf.GGMLQuantizationType, kind) if kind else None
        writer.add_tensor(name, data, raw_dtype=raw)  # shape from the block bytes per row
    return _write(writer, Path(out), len(tensors), kinds)


def _write(writer, out: Path, n: int, kinds: list[str]) -> dict:
    with atomic_file(out) as tmp:  # the writer streams to the temp file; no copy in memory
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "tensors": n, "types": kinds, "bytes": out.stat().st_size}
