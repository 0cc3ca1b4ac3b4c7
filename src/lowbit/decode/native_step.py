"""Decoder tokens as one C call: ``lb_decode_tokens`` (``kernels/csrc/lowbit_cpu_decode.c``) runs every
layer, the final norm and the LM head of one token (a decode step) or of M tokens (a prompt: each linear
once on M rows, causal attention) on lowbit's C kernels, with no Python or framework dispatch between them.

``plan(net)`` returns why a ``_Step`` cannot run there (a string) or None. It can where the model is
float32, every linear of the step (q/k/v, o, gate/up, down, LM head) is a ``NativeLinear`` (a quantized
layer on ``cpu_native`` or ``cpu_native_a8``), the norms are Llama's or Gemma's RMS norm, the activation is
SiLU or tanh-GELU and the rotary tables depend on the position only (read once for every cache slot).
``NativeStep(net, arch, k_cache, v_cache)`` then describes the step to the C library in ctypes structures
pointing into the modules' own tensors (no copies; it keeps them alive) and the given caches; a new one is
built when the caches are reallocated.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.decode.layers import Arch, Fused, NativeLinear
from lowbit.kernels import native

_i64, _i32, _ptr, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
NORMS = {"LlamaRMSNorm": 0, "MistralRMSNorm": 0, "Qwen2RMSNorm": 0, "GemmaRMSNorm": 1}  # 1: (1 + w)
STATIC_ROPE = ("default", "linear", "llama3")  # tables that depend on the position only
ACTS = {"SiLUActivation": 0, "SiLU": 0, "GELUTanh": 1, "PytorchGELUTanh": 1}


class _Lin(ctypes.Structure):
    _fields_ = [(n, _ptr) for n in ("w", "scale", "zp", "lut", "bias")] + [
        *((n, _i64) for n in ("N", "K", "row_bytes", "group", "lut_stride")),
        *((n, _i32) for n in ("code", "offset", "sk", "zk", "a8", "pad")),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((n, _ptr) for n in ("norm1", "norm2", "k_cache", "v_cache")),
        ("qkv", _Lin * 3),
        ("gu", _Lin * 2),
        ("o", _Lin),
        ("down", _Lin),
        ("n_qkv", _i32),
        ("n_gu", _i32),
    ]


class _Decoder(ctypes.Structure):
    _fields_ = [
        *((n, _i64) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "cache_len")),
        ("scaling", _f32),
        ("eps", _f32),
        ("norm_kind", _i32),
        ("act", _i32),
        *((n, _ptr) for n in ("rope_cos", "rope_sin", "final_norm")),
        ("head", _Lin),
        ("layer", ctypes.POINTER(_Layer)),
    ]


@cache
def _check_layout(lib) -> None:
    """Refuse a library whose structures differ in size from these ctypes ones (checked once per library)."""
    sizes = (ctypes.c_int64 * 3)()
    lib.lb_decode_sizes(sizes)
    mine = (ctypes.sizeof(_Lin), ctypes.sizeof(_Layer), ctypes.sizeof(_Decoder))
    if tuple(sizes) != mine:
        raise LowbitError(f"lb_decode_tokens' structures are {tuple(sizes)} bytes, expected {mine}")


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _linears(block) -> list[nn.Module]:
    return [*block.qkv.parts, block.o, *block.gate_up.parts, block.down]


def plan(net: nn.Module) -> str | None:
    """Why ``net`` (a ``decoder._Step``) cannot run as one C call, or None if it can."""
    lib = native.library()
    if lib is None:
        return "lowbit's C kernels are not available"
    rope = getattr(net.rotary, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rotary embedding {rope!r} depends on the sequence length"
    norms = [net.norm, *(n for b in net.blocks for n in (b.norm1, b.norm2))]
    if any(type(n).__name__ not in NORMS for n in norms):
        return f"norm {type(norms[0]).__name__} is not a known RMS norm"
    if len({(type(n).__name__, _eps(n)) for n in norms}) != 1:
        return "the norms differ in kind or epsilon"
    if any(n.weight.dtype != torch.float32 for n in norms):
        return "the model is not float32"
    if any(type(b.act).__name__ not in ACTS for b in net.blocks):
        return f"activation {type(net.blocks[0].act).__name__} is not SiLU or tanh-GELU"
    layers = [lin for b in net.blocks for lin in _linears(b)] + [net.head]
    if any(not isinstance(lin, NativeLinear) for lin in layers):
        return "not every linear runs on lowbit's C kernels (float or unsupported layers)"
    return None


class NativeStep:
    """``step(h (M, hidden) float32, position) -> logits (1, vocab)`` of the last of M tokens at positions
    ``position .. position + M - 1``: ``h`` (a buffer it overwrites) holds their embeddings; the caches
    ``(1, kv_heads, L, head_dim)`` are written at those positions. ``max_rows``: the most tokens one call
    should take, the smallest GEMV row limit of the linears (more rows would run their GEMV kernels where
    the torch path takes tiled sgemm), unlimited where every linear takes int8 dot products (the
    ``cpu_native_a8`` kernel runs any number of rows)."""

    def __init__(self, net: nn.Module, arch: Arch, k_cache: list, v_cache: list) -> None:
        reason = plan(net)
        if reason is not None:
            raise LowbitError(f"the one-call decode step cannot run this model: {reason}")
        self._lib = native.library()
        _check_layout(self._lib)
        self._keep: list[torch.Tensor] = []
        length = k_cache[0].shape[2]
        cos, sin = net.rotary(k_cache[0], torch.arange(length)[None])
        blocks = net.blocks
        layers = (_Layer * len(blocks))(
            *(self._layer(b, k, v) for b, k, v in zip(blocks, k_cache, v_cache, strict=True))
        )
        self._keep += [cos, sin, *k_cache, *v_cache]
        first = blocks[0]
        self._layers = layers
        self.vocab = net.head.out_features
        linears = [lin for b in blocks for lin in _linears(b)] + [net.head]
        self.max_rows = 1 << 62 if all(x.a8 for x in linears) else min(x.max_rows for x in linears)
        self.desc = _Decoder(
            layers=len(blocks), hidden=net.norm.weight.numel(), heads=arch.heads, kv_heads=arch.kv_heads,
            head_dim=arch.head_dim, inter=sum(first.gate_up.sizes) // 2, cache_len=length,
            scaling=arch.scaling, eps=_eps(net.norm), norm_kind=NORMS[type(net.norm).__name__],
            act=ACTS[type(first.act).__name__], rope_cos=self._p(cos[0]), rope_sin=self._p(sin[0]),
            final_norm=self._p(net.norm.weight), head=self._lin(net.head), layer=layers,
        )  # fmt: skip
        self._ref = ctypes.byref(self.desc)

    def _p(self, t: torch.Tensor | None) -> int | None:
        """``t``'s address (kept alive with this step); None for None."""
        if t is None:
            return None
        if not t.is_contiguous():
            raise LowbitError("the one-call decode step needs contiguous tensors")
        self._keep.append(t)
        return t.data_ptr()

    def _lin(self, lin: NativeLinear) -> _Lin:
        q, a = lin.layer, lin.args
        return _Lin(
            w=self._p(q.qweight), scale=self._p(q.scale), zp=self._p(q.zero_point), lut=self._p(lin.lut),
            bias=self._p(lin.bias32), N=q.qweight.shape[0], K=q.cols, row_bytes=q.qweight.shape[1],
            group=a["group"], lut_stride=a["lut_stride"], code=a["code"], offset=a["offset"],
            sk=a["scale_kind"], zk=a["zp_kind"], a8=int(lin.a8), pad=0,
        )  # fmt: skip

    def _lins(self, fused: Fused, n: int):
        parts = list(fused.parts)
        return (_Lin * n)(*(self._lin(p) for p in parts)), len(parts)

    def _layer(self, block, k: torch.Tensor, v: torch.Tensor) -> _Layer:
        qkv, n_qkv = self._lins(block.qkv, 3)
        gu, n_gu = self._lins(block.gate_up, 2)
        return _Layer(
            norm1=self._p(block.norm1.weight), norm2=self._p(block.norm2.weight), k_cache=self._p(k),
            v_cache=self._p(v), qkv=qkv, gu=gu, o=self._lin(block.o), down=self._lin(block.down),
            n_qkv=n_qkv, n_gu=n_gu,
        )  # fmt: skip

    def __call__(self, h: torch.Tensor, position: int) -> torch.Tensor:
        if h.dtype != torch.float32 or h.dim() != 2 or not h.is_contiguous():
            raise LowbitError("the one-call decode step takes a contiguous float32 (tokens, hidden) buffer")
        logits = torch.empty(1, self.vocab)
        rows, out = h.shape[0], logits.data_ptr()
        rc = self._lib.lb_decode_tokens(self._ref, position, rows, h.data_ptr(), out, native.threads())
        if rc:
            where = f"positions {position}..{position + rows - 1}"
            raise LowbitError(f"lb_decode_tokens failed (code {rc}) at {where}")
        return logits
