"""GPTQ and AWQ layers of other tools' checkpoints, repacked into lowbit ``QLinear`` layers.

Stored layouts (b bits per code; in each int32 word, field ``i`` holds bits ``b*i .. b*i+b-1``):

| producer (quant_method)        | qweight            | qzeros                 | scales            |
|--------------------------------|--------------------|------------------------|-------------------|
| GPTQ: AutoGPTQ, GPTQModel      | ``(in*b/32, out)`` | ``(groups, out*b/32)`` | ``(groups, out)`` |
| AWQ GEMM: AutoAWQ              | ``(in, out/8)``    | ``(groups, out/8)``    | ``(groups, out)`` |

GPTQ packs codes along the inputs (qweight's dim 0) and zero points along the outputs, in order; AWQ packs
both along the outputs, field ``i`` of a word holding column ``AWQ_ORDER[i]`` of its eight (0 2 4 6 1 3 5 7).
Both mean ``W[o, i] = (q[o, i] - z[o, g]) * s[o, g]`` with ``g`` the group of input ``i``, which is exactly
lowbit's ``dequantize``: the codes become ``uint{b}`` codes with that zero point, or, when the config says
``sym`` and every zero point is ``2**(b-1)``, ``int{b}`` codes ``q - 2**(b-1)`` with zero point 0. Scales
keep their stored dtype (float16), so ``dequantized_weight()`` is the producer's dequantization computed in
float32. GPTQ's ``g_idx`` (group of each input) must be ``arange(in) // group_size``: lowbit's groups are
contiguous runs of inputs, so act-order checkpoints (``desc_act`` with a permuted ``g_idx``) are refused.

GPTQ ``checkpoint_format`` "gptq" (v1) stores each qzeros word minus one in every field (``0x11111111`` at
4 bits), with the borrows of int32 arithmetic: GPTQModel's v2 -> v1 conversion, which lowbit undoes word by
word (AutoGPTQ's per-field ``z - 1`` writes the same words whenever every ``z >= 1``); "gptq_v2" stores
``z``. Refused with a message: 3-bit GPTQ (fields straddle words), other GPTQ formats (marlin, bitblas...),
pack dtypes other than int32, per-module overrides (``dynamic``), and AWQ other than the GEMM packing of
AutoAWQ with zero points (versions gemv, gemv_fast, marlin; llm-awq's backend; ``zero_point: false``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.algorithms.rtn import QuantizedTensor
from lowbit.core.errors import CheckpointError
from lowbit.core.packing import unpack
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec
from lowbit.nn.modules import QLinear

# safetensors dtype codes -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # fmt: skip
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
WORDS = (torch.int32,)
GPTQ_BITS = (2, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
KINDS = {int: "an integer", bool: "true or false", str: "a string"}  # config field kinds, in words
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of an AWQ word holds column AWQ_ORDER[i] of its 8 columns
AWQ_COLUMNS = tuple(sorted(range(8), key=AWQ_ORDER.__getitem__))  # column c is field AWQ_COLUMNS[c]


class PeerTensors:
    """The tensors of a folder's safetensors files by name, each read from disk only when ``get`` asks
    for it, after its stored shape and dtype were checked; ``unread()`` lists the names never asked for."""

    def __init__(self, folder: Path, files: list[Path]) -> None:
        self.folder = folder
        self._file: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        self._read: set[str] = set()
        for path in files:
            for name, info in _header(path).items():
                if name in self._file:
                    raise CheckpointError(f"{path}: tensor {name} is also stored in {self._file[name]}")
                self._file[name], self._info[name] = path, info

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def unread(self) -> list[str]:
        return sorted(set(self._file) - self._read)

    def get(self, name: str, shape=None, dtypes=None, why: str = "") -> torch.Tensor:
        """Tensor ``name``; ``CheckpointError`` naming it if it is missing or its shape is not ``shape``
        or its dtype not one of ``dtypes`` (None: any). ``why``: what the expectation follows from."""
        note = f" ({why})" if why else ""
        if name not in self._file:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing{note}")
        path, (have, code) = self._file[name], self._info[name]
        if (shape is not None and have != tuple(shape)) or (
            dtypes is not None and DTYPES.get(code) not in dtypes
        ):
            want = "/".join(str(d)[6:] for d in dtypes) if dtypes is not None else "any dtype"
            raise CheckpointError(
                f"{path}: tensor {name} is {list(have)} {code}, expected {list(shape or have)} {want}{note}"
            )
        self._read.add(name)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {name} is unreadable ({str(e)[:120]})") from None


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype code) from the header of ``path``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupted ({str(e)[:120]})") from None


@dataclass(frozen=True)
class PeerLayout:
    """What an importer read from a peer's quantization config: ``summary`` (the loaded model's
    ``lowbit_config``) and ``repack(fqn, linear, tensors)``: the ``QLinear`` holding the stored weight
    of ``linear`` (a float skeleton's ``nn.Linear``), or None where the folder stores it as float."""

    summary: dict
    repack: Callable[[str, nn.Linear, PeerTensors], QLinear | None]


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(..., n * 32 // bits)`` of int32 words ``(..., n)`` (``bits`` dividing 32): field
    ``i`` of word ``k`` is code ``k * 32 // bits + i``. That is lowbit's own bit stream
    (``lowbit.core.packing``) in the words' little-endian bytes, as lowbit's codec assumes a
    little-endian host."""
    return unpack(words.contiguous().view(torch.uint8), bits, words.shape[-1] * 32 // bits)


def gptq_v1_words(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ v1 zero-point words as v2 words (int32): one added to every field, int32 wrap-around."""
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = (qzeros.long() + ones) & 0xFFFFFFFF
    return (words - ((words >> 31) << 32)).to(torch.int32)


def awq_columns(fields: torch.Tensor) -> torch.Tensor:
    """Codes ``(..., n)`` in column order from AWQ's interleaved fields (``unpack_words(., 4)``)."""
    lead, n = fields.shape[:-1], fields.shape[-1]
    return fields.reshape(*lead, n // 8, 8)[..., list(AWQ_COLUMNS)].reshape(*lead, n)


def _field(qcfg: dict, names: tuple[str, ...], where: str, kind: type, default=None):
    """The value of the first of ``names`` (synonyms) in ``qcfg``, ``default`` if none; ``CheckpointError``
    if it is not of ``kind`` or two synonyms disagree."""
    found = [(n, qcfg[n]) for n in names if qcfg.get(n) is not None]
    if not found:
        if default is None:
            raise CheckpointError(f"{where}: {names[0]} is missing")
        return default
    name, value = found[0]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where}: {name} {value!r} is not {KINDS[kind]}")
    for other, v in found[1:]:
        if (v.lower() if isinstance(v, str) else v) != (value.lower() if isinstance(value, str) else value):
            raise CheckpointError(f"{where}: {name} {value!r} and {other} {v!r} disagree")
    return value.lower() if isinstance(value, str) else value


def _group_size(qcfg: dict, names: tuple[str, ...], where: str) -> int:
    group = _field(qcfg, names, where, int)
    if group != -1 and group < 1:
        raise CheckpointError(f"{where}: {names[0]} {group} is neither -1 (per channel) nor positive")
    return group


def gptq(qcfg: dict, where: str) -> PeerLayout:
    """The layout of a GPTQ config (AutoGPTQ, GPTQModel, transformers' GPTQConfig), validated."""
    bits = _field(qcfg, ("bits",), where, int)
    if bits not in GPTQ_BITS:
        why = " (3-bit GPTQ packs codes across int32 words)" if bits == 3 else ""
        raise CheckpointError(f"{where}: GPTQ bits {bits} not supported{why}; lowbit imports 2, 4 and 8 bits")
    group = _group_size(qcfg, ("group_size",), where)
    sym = _field(qcfg, ("sym",), where, bool, True)
    desc_act = _field(qcfg, ("desc_act",), where, bool, False)
    fmt = _field(qcfg, ("checkpoint_format", "format"), where, str, "gptq")
    if fmt not in GPTQ_FORMATS or qcfg.get("is_marlin_format"):
        fmt = "marlin" if qcfg.get("is_marlin_format") else fmt
        raise CheckpointError(
            f"{where}: GPTQ checkpoint_format {fmt!r} not supported; lowbit imports gptq, gptq_v2"
        )
    pack = _field(qcfg, ("pack_dtype",), where, str, "int32")
    if pack != "int32":
        raise CheckpointError(f"{where}: pack_dtype {pack!r} not supported; lowbit imports int32 words")
    if qcfg.get("dynamic"):
        raise CheckpointError(f"{where}: per-module overrides (dynamic) are not supported")
    summary = {"type": "imported", "quant_method": "gptq", "method": "gptq", "bits": bits,
               "group_size": None if group == -1 else group, "symmetric": sym, "desc_act": desc_act,
               "checkpoint_format": fmt}  # fmt: skip
    repack = partial(_gptq_layer, bits=bits, group=group, sym=sym, desc_act=desc_act, v1=fmt == "gptq")
    return PeerLayout(summary, repack)


def _gptq_layer(
    fqn: str, linear: nn.Linear, t: PeerTensors, *, bits: int, group: int, sym: bool, desc_act: bool, v1: bool
) -> QLinear | None:
    if f"{fqn}.qweight" not in t:
        return None
    n_in, n_out = linear.in_features, linear.out_features
    size = n_in if group == -1 else group
    why = f"{n_in} inputs, {n_out} outputs, bits {bits}, group_size {group}"
    if (n_in * bits) % 32 or (n_out * bits) % 32:
        raise CheckpointError(f"{t.folder}: {fqn}: {why} do not fill whole int32 words")
    groups = math.ceil(n_in / size)
    qweight = t.get(f"{fqn}.qweight", (n_in * bits // 32, n_out), WORDS, why)
    qzeros = t.get(f"{fqn}.qzeros", (groups, n_out * bits // 32), WORDS, why)
    scales = t.get(f"{fqn}.scales", (groups, n_out), FLOATS, why)
    if f"{fqn}.g_idx" in t or desc_act:
        check_g_idx(t, f"{fqn}.g_idx", n_in, size, why, f"act-order, desc_act={str(desc_act).lower()}")
    codes = unpack_words(qweight.t(), bits)
    zeros = unpack_words(gptq_v1_words(qzeros, bits) if v1 else qzeros, bits).t()
    return qlinear_from_codes(fqn, linear, t, bits, group, sym, codes, zeros, scales.t())


def check_g_idx(t: PeerTensors, name: str, n_in: int, size: int, why: str, note: str) -> None:
    """Tensor ``name`` (the group of each of ``n_in`` inputs) must put input ``i`` in group ``i // size``:
    lowbit's groups are contiguous. ``note``: what a reordering means in the producer's terms."""
    g_idx = t.get(name, (n_in,), (torch.int32, torch.int64), why)
    if not torch.equal(g_idx.long(), torch.arange(n_in) // size):
        raise CheckpointError(
            f"{t.folder}: {name} does not assign inputs to groups in order ({note}); lowbit's groups are "
            f"contiguous runs of {size} inputs, so re-quantize without act-order"
        )


def awq(qcfg: dict, where: str) -> PeerLayout:
    """The layout of an AWQ config (AutoAWQ, transformers' AwqConfig, GPTQModel's AWQ), validated."""
    bits = _field(qcfg, ("bits", "w_bit"), where, int)
    if bits != 4:
        raise CheckpointError(f"{where}: AWQ bits {bits} not supported; AWQ GEMM packs 4-bit codes")
    group = _group_size(qcfg, ("group_size", "q_group_size"), where)
    version = _field(qcfg, ("version", "checkpoint_format", "format"), where, str, "gemm")
    if version != "gemm":
        raise CheckpointError(
            f"{where}: AWQ version {version!r} not supported; lowbit imports the GEMM packing"
        )
    if not _field(qcfg, ("zero_point",), where, bool, True):
        raise CheckpointError(f"{where}: AWQ without zero points (zero_point false) is not supported")
    if _field(qcfg, ("backend",), where, str, "auto") == "llm-awq":  # packs for its GEMV kernels
        raise CheckpointError(
            f"{where}: AWQ backend 'llm-awq' not supported; lowbit imports AutoAWQ's packing"
        )
    summary = {"type": "imported", "quant_method": "awq", "method": "awq", "bits": 4, "symmetric": False,
               "group_size": None if group == -1 else group, "version": "gemm"}  # fmt: skip
    return PeerLayout(summary, partial(_awq_layer, group=group))


def _awq_layer(fqn: str, linear: nn.Linear, t: PeerTensors, *, group: int) -> QLinear | None:
    if f"{fqn}.qweight" not in t:
        return None
    n_in, n_out = linear.in_features, linear.out_features
    size = n_in if group == -1 else group
    why = f"{n_in} inputs, {n_out} outputs, 4 bits, group_size {group}"
    if n_in % size or n_out % 8:
        raise CheckpointError(f"{t.folder}: {fqn}: AWQ GEMM needs whole groups and outputs in eights ({why})")
    qweight = t.get(f"{fqn}.qweight", (n_in, n_out // 8), WORDS, why)
    qzeros = t.get(f"{fqn}.qzeros", (n_in // size, n_out // 8), WORDS, why)
    scales = t.get(f"{fqn}.scales", (n_in // size, n_out), FLOATS, why)
    codes = awq_columns(unpack_words(qweight, 4)).t()
    zeros = awq_columns(unpack_words(qzeros, 4)).t()
    return qlinear_from_codes(fqn, linear, t, 4, group, False, codes, zeros, scales.t())


def qlinear_from_codes(
    fqn: str, linear: nn.Linear, t: PeerTensors, bits: int, group: int, sym: bool,
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, cls: type[QLinear] = QLinear,
) -> QLinear:  # fmt: skip
    """A ``cls`` (``QLinear`` or a subclass) holding ``(codes - zeros) * scales`` (unsigned codes
    ``(out, in)``, qparams ``(out, groups)``; group -1: per channel) and the stored bias of ``linear``."""
    gran = PerChannel(0) if group == -1 else PerGroup(group)
    scale_dtype, scales = str(scales.dtype)[6:], scales.contiguous()
    mid = 1 << (bits - 1)
    if sym:
        if bool((zeros != mid).any()):
            raise CheckpointError(
                f"{t.folder}: {fqn}.qzeros holds zero points other than {mid}, but the config says sym"
            )
        spec = QuantSpec(f"int{bits}", True, gran, scale_dtype)
        signed = (codes.to(torch.int16) - mid).to(torch.int8)
        qt = QuantizedTensor(signed, scales, torch.zeros(zeros.shape, dtype=torch.int8), spec)
    else:
        spec = QuantSpec(f"uint{bits}", False, gran, scale_dtype)
        qt = QuantizedTensor(codes.contiguous(), scales, zeros.contiguous(), spec)
    dtype = linear.weight.dtype
    q = cls(linear.in_features, linear.out_features, spec, linear.bias is not None, dtype)
    q.set_weight(qt)
    if linear.bias is not None:
        q.bias = t.get(f"{fqn}.bias", (linear.out_features,), FLOATS).to(dtype)
    return q
