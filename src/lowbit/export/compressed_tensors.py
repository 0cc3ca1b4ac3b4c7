"""compressed-tensors export: a Hugging Face folder that transformers (with ``compressed-tensors``) and
vLLM load, holding lowbit's own codes.

| lowbit layer                       | format             | tensors per Linear                         |
|------------------------------------|--------------------|--------------------------------------------|
| ``QLinear`` int4/int8, sym or      | ``pack-quantized`` | ``weight_packed`` int32 ``(out, in*b/32)``, |
| asym, per channel or per group     |                    | ``weight_scale (out, in/g)``, zero points  |
|                                    |                    | (asym) int32 packed along dim 0,           |
|                                    |                    | ``weight_shape``                           |
| ``QDynamicLinear`` (W8A8, token)   | ``int-quantized``  | ``weight`` int8, ``weight_scale (out, 1)`` |
| ``QStaticLinear`` (W8A8, tensor)   | ``int-quantized``  | as above, ``input_scale``,                 |
|                                    |                    | ``input_zero_point`` (and ``output_*``)    |

compressed-tensors holds signed codes: lowbit's unsigned codes ``n`` and zero points ``z`` (uint4, uint8)
become ``n - 2**(b-1)`` and ``z - 2**(b-1)``, so ``(q - z) * s`` is unchanged. Packing puts element ``i``
of a row at bits ``b*i`` of the little-endian int32 stream, stored as ``q + 2**(b-1)``. Scales are stored
in the layer's float dtype (lowbit's float16 scales are exact there). Layers that share one spec form
one config group whose ``targets`` are their names; float Linears are listed in ``ignore``. A quantized
embedding (no compressed-tensors reader) is written as its dequantized float weight and reported.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.core.codec import decode
from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_dir
from lowbit.core.packing import pack
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec
from lowbit.nn.modules import QEmbedding, QLinear, QuantizedModule, QuantizedWeightModule

WEIGHTS = "model.safetensors"
_DYNAMIC = "QDynamicLinear"
_STATIC = "QStaticLinear"


def _args(bits: int, symmetric: bool, strategy: str, group: int | None, dynamic: bool = False) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group,
            "strategy": strategy, "dynamic": dynamic, "actorder": None, "observer": None}  # fmt: skip


def _weight_args(fqn: str, spec: QuantSpec, cols: int, common: int) -> dict:
    """compressed-tensors' QuantizationArgs of a weight spec over ``cols`` inputs, or ``LowbitError``
    saying what fits (``common``: the gcd of every quantized layer's input count)."""
    fmt, gran = spec.fmt, spec.granularity
    ok_fmt = fmt.kind == "int" and fmt.bits in (4, 8) and (fmt.qmin < 0) == spec.symmetric
    if not ok_fmt or not isinstance(gran, (PerChannel, PerGroup)) or gran == PerChannel(1):
        raise LowbitError(
            f"{fqn}: compressed-tensors holds int4/int8 weights, symmetric (int) or asymmetric (uint), per "
            f"output channel or per group of inputs (e.g. w4g128, w4g128-sym, w8-sym); this layer is "
            f"{spec.format} {'sym' if spec.symmetric else 'asym'} {gran}"
        )
    if isinstance(gran, PerGroup):
        if cols % gran.size:
            fits = next((g for g in (128, 64, 32, 16, 8) if common % g == 0), None)
            raise LowbitError(
                f"{fqn}: compressed-tensors needs whole groups, but its {cols} inputs are not a multiple of "
                f"group {gran.size}"
                + (f"; quantize with group {fits} (e.g. w{fmt.bits}g{fits})" if fits else "")
            )
        return _args(fmt.bits, spec.symmetric, "group", gran.size)
    return _args(fmt.bits, spec.symmetric, "channel", None)


def _act_args(fqn: str, m: QLinear) -> tuple[dict | None, dict | None]:
    """(input_activations, output_activations) of a W8A8 layer; (None, None) for weight-only."""
    kind = type(m).__name__
    if kind == _DYNAMIC:
        return _args(8, False, "token", None, dynamic=True), None
    if kind != _STATIC:
        return None, None
    fmt = m.act_spec.fmt
    if fmt.bits != 8:
        raise LowbitError(f"{fqn}: compressed-tensors holds 8-bit activations; this layer's are {fmt.name}")
    act = _args(8, m.act_spec.symmetric, "tensor", None)
    return act, (act if m.requantize_output else None)


def _signed(codes: torch.Tensor, bits: int, unsigned: bool) -> torch.Tensor:
    """compressed-tensors' signed code of a lowbit code (int8 storage)."""
    return (codes.to(torch.int16) - (1 << (bits - 1)) * int(unsigned)).to(torch.int8)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes ``q (rows, n)`` (int8) as compressed-tensors does: int32
    ``(rows, ceil(n * bits / 32))``, element ``i`` at bits ``bits * i`` of the row's little-endian stream,
    stored as ``q + 2**(bits - 1)``: lowbit's own bit stream (``lowbit.core.packing``) read as
    little-endian words, as lowbit's codec assumes a little-endian host."""
    if bits not in (4, 8):
        raise LowbitError(f"compressed-tensors packing here covers 4 and 8 bits, not {bits}")
    data = pack((q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8), bits)
    return torch.nn.functional.pad(data, (0, -data.shape[-1] % 4)).contiguous().view(torch.int32)


def _linear_tensors(fqn: str, m: QLinear, dtype: torch.dtype, fmt_name: str) -> dict[str, torch.Tensor]:
    spec, bits = m.spec, m.spec.fmt.bits
    unsigned = not spec.symmetric
    q = _signed(decode(m.qweight, spec.fmt, m.cols), bits, unsigned)
    out = {f"{fqn}.weight_scale": m.scale.to(dtype).reshape(m.rows, -1).contiguous()}
    if fmt_name == "int-quantized":
        out[f"{fqn}.weight"] = q.contiguous()
    else:
        out[f"{fqn}.weight_packed"] = pack_int32(q, bits)
        out[f"{fqn}.weight_shape"] = torch.tensor([m.rows, m.cols], dtype=torch.int64)
    if m.zero_point is not None and unsigned:
        zp = _signed(m.zero_point.reshape(m.rows, -1), bits, True)
        out[f"{fqn}.weight_zero_point"] = (
            zp.contiguous()
            if fmt_name == "int-quantized"
            else pack_int32(zp.T.contiguous(), bits).T.contiguous()
        )
    if m.bias is not None:
        out[f"{fqn}.bias"] = m.bias.to(dtype).contiguous()
    if type(m).__name__ == _STATIC:
        for side in ("input",) + (("output",) if m.requantize_output else ()):
            out[f"{fqn}.{side}_scale"] = getattr(m, f"{side}_scale").reshape(1).to(dtype)
            zp = getattr(m, f"{side}_zero_point").reshape(1)
            out[f"{fqn}.{side}_zero_point"] = _signed(zp, 8, not m.act_spec.symmetric)
    return out


def _group_key(fqn: str, m: QLinear, common: int) -> str:
    weights = _weight_args(fqn, m.spec, m.cols, common)
    inputs, outputs = _act_args(fqn, m)
    return json.dumps({"weights": weights, "input_activations": inputs, "output_activations": outputs})


def _check_structure(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise LowbitError("compressed-tensors export writes Hugging Face models (the model has no HF config)")
    if getattr(model, "lowbit_identity", None):
        raise LowbitError(
            f"compressed-tensors export keeps the model's own modules; folded layers "
            f"{list(model.lowbit_identity)[:3]} cannot be expressed (export to ONNX instead)"
        )
    for fqn, m in model.named_modules():
        if isinstance(m, QuantizedModule) and not isinstance(m, (QLinear, QEmbedding)):
            raise LowbitError(
                f"{fqn}: {type(m).__name__} has no compressed-tensors layout (Linear int4/int8 weight-only, "
                "W8A8 dynamic or static per tensor)"
            )


def _check_biases(model: nn.Module) -> None:
    """A Linear with a bias its architecture lacks (static W8A8's bias correction adds one) would be
    dropped by the readers, which build the model from config.json: ``LowbitError`` naming it."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    for fqn, m in model.named_modules():
        if isinstance(m, QLinear) and m.bias is not None:
            if getattr(skeleton.get_submodule(fqn), "bias", None) is None:
                raise LowbitError(
                    f"{fqn}: holds a bias its architecture does not have (added by bias correction), which "
                    "transformers and vLLM would drop; quantize with StaticW8A8(bias_correction=False)"
                )


def quantization_config(model: nn.Module) -> tuple[dict, dict[str, str]]:
    """(compressed-tensors ``quantization_config``, {fqn: its format}) of ``model``'s quantized Linears."""
    linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, QLinear)}
    if not linears:
        raise LowbitError("the model has no quantized Linear layer; compressed-tensors would hold nothing")
    common = math.gcd(*(m.cols for m in linears.values()))
    groups: dict[str, list[str]] = {}
    for fqn, m in linears.items():
        groups.setdefault(_group_key(fqn, m, common), []).append(fqn)
    ignore = [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear]
    config_groups, names = {}, {}
    for i, (key, fqns) in enumerate(groups.items()):
        scheme = json.loads(key)
        fmt = "int-quantized" if scheme["input_activations"] else "pack-quantized"
        config_groups[f"group_{i}"] = {"targets": fqns, **scheme, "format": fmt}
        names.update(dict.fromkeys(fqns, fmt))
    formats = set(names.values())
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    config = {"quant_method": "compressed-tensors", "format": fmt,
              "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
              "kv_cache_scheme": None, "global_compression_ratio": None}  # fmt: skip
    return config, names


def _state(model: nn.Module, formats: dict[str, str], dtype: torch.dtype) -> tuple[dict, list[str]]:
    """(tensors to write, quantized embeddings written as float)."""
    tensors, floats, owned = {}, [], set()
    for fqn, m in model.named_modules():
        if isinstance(m, QLinear):
            tensors.update(_linear_tensors(fqn, m, dtype, formats[fqn]))
        elif isinstance(m, QuantizedWeightModule):  # QEmbedding
            tensors[f"{fqn}.weight"] = m.dequantized_weight(dtype).contiguous()
            floats.append(fqn)
        else:
            continue
        owned |= {f"{fqn}.{n}" for n, _ in m.named_buffers()}
    for name, t in model.state_dict().items():
        if name not in owned and name not in tensors:
            tensors[name] = t.detach().contiguous()
    return tensors, floats


def _hf_config(model: nn.Module, qconfig: dict, tensors: dict) -> dict:
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qconfig
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    tied = cfg.get("tie_word_embeddings") and "lm_head.weight_scale" not in tensors
    if tied and head is not None and embed is not None and head.data_ptr() == embed.data_ptr():
        tensors.pop("lm_head.weight")  # stored once, as transformers writes a tied head
    elif cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # a quantized head next to a float embedding: two tensors
    return cfg


def is_compressed_tensors(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a compressed-tensors model (what ``overwrite`` may replace)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict)
        and (cfg.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"
    )


def export_compressed_tensors(
    model: nn.Module, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False
) -> dict:
    """Write ``model`` (a Hugging Face model quantized by lowbit) as a compressed-tensors folder ``out``
    (config.json with ``quantization_config``, model.safetensors, tokenizer), atomically. Returns
    {"out", "bytes", "format", "groups", "float_embeddings"}; ``LowbitError`` before writing anything if a
    layer has no compressed-tensors layout. ``overwrite`` replaces an empty or compressed-tensors folder."""
    from safetensors.torch import save_file

    _check_structure(model)
    qconfig, formats = quantization_config(model)
    _check_biases(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors, floats = _state(model, formats, dtype)
    cfg = _hf_config(model, qconfig, tensors)
    with atomic_dir(out, overwrite, replaceable=is_compressed_tensors) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    path = Path(out)
    return {"out": str(path), "bytes": (path / WEIGHTS).stat().st_size, "format": qconfig["format"],
            "groups": len(qconfig["config_groups"]), "float_embeddings": floats}  # fmt: skip
