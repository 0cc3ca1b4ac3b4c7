"""The decoder step's building blocks: what a Hugging Face decoder must look like, fused linears, attention.

``describe(model)`` reads a causal LM of a known family (``FAMILIES``) into an ``Arch``, or raises
``Unsupported`` naming what does not fit. ``Fused`` runs several linears that share an input as one
call: quantized ``QLinear``s of one spec are stacked row-wise into one layer (one kernel call reads the
stacked codes; each output row is computed exactly as before, so results are bit-identical); anything
else runs part by part. ``Block`` is one decoder layer over a static KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.kernels import torch_ops
from lowbit.kernels.cpu_native import bias32, gemv_rows
from lowbit.kernels.registry import select
from lowbit.nn import QLinear

# model_type -> families whose decoder layer is Llama's: pre-norm, q/k/v/o attention with rotary
# positions, gated MLP (down(act(gate(x)) * up(x))). Norms, activations, rotary tables and the
# embedding (Gemma's scaled one included) are the model's own modules, called as they are.
FAMILIES = ("llama", "mistral", "qwen2", "gemma")


class Unsupported(LowbitError):
    """The model is not one the fast path can run (the message names why)."""


@dataclass(frozen=True)
class Arch:
    """What the step needs beyond the modules: layer count, heads, head width, attention scale."""

    family: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    max_positions: int


def _sliding(cfg) -> bool:
    types = getattr(cfg, "layer_types", None) or ()
    if "sliding_attention" in types:
        return True
    return cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None


def describe(model: nn.Module) -> Arch:
    """``model``'s ``Arch``; ``Unsupported`` for another family or a variant the step does not implement."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        raise Unsupported(f"architecture {family or type(model).__name__!r} (known: {', '.join(FAMILIES)})")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise Unsupported(f"{type(model).__name__} has no .model.layers/.lm_head")
    if _sliding(cfg):
        raise Unsupported(f"{family} with sliding-window attention")
    attn = inner.layers[0].self_attn
    heads = cfg.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported(f"{family} with partial rotary embeddings")
    return Arch(
        family=family,
        layers=len(inner.layers),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        scaling=float(getattr(attn, "scaling", head_dim**-0.5)),
        max_positions=int(getattr(cfg, "max_position_embeddings", 1 << 30)),
    )


def _view(layer: QLinear, backend: str | None) -> QLinear:
    """A ``QLinear`` on ``layer``'s own buffers (no copy) that runs ``backend``."""
    out = QLinear(0, 0, layer.spec, False, layer.dtype, backend)
    out.rows, out.cols, out.in_features, out.out_features = layer.rows, layer.cols, layer.cols, layer.rows
    out.share_weight(layer)
    out.bias = layer.bias
    out.routes = getattr(layer, "routes", None)
    return out


def _stackable(parts: list[nn.Module]) -> bool:
    first = parts[0]
    if len(parts) < 2 or any(type(p) is not QLinear for p in parts):
        return False
    same = {(p.spec, p.cols, p.dtype, p.scale.dtype, p.bias is None, p.levels is None) for p in parts}
    return len(same) == 1 and first.levels is None


def _stack(parts: list[QLinear], backend: str | None) -> QLinear:
    """One ``QLinear`` whose rows are ``parts``' rows in order (codes, scales, zero points, biases)."""
    first = parts[0]
    out = QLinear(0, 0, first.spec, False, first.dtype, backend)
    rows = sum(p.rows for p in parts)
    out.rows, out.cols, out.in_features, out.out_features = rows, first.cols, first.cols, rows
    out.qweight = torch.cat([p.qweight for p in parts])
    out.scale = torch.cat([p.scale for p in parts])
    out.zero_point = None if first.zero_point is None else torch.cat([p.zero_point for p in parts])
    out.bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    return out


def _runnable(layer: QLinear, backend: str | None) -> str | None:
    """``backend`` if it can run ``layer`` on the CPU, else None (the layer's own choice)."""
    if backend is None:
        return layer.backend
    try:
        select(layer.KERNEL_OP, layer, torch.device("cpu"), backend)
    except LowbitError:
        return layer.backend
    return backend


NATIVE = {"cpu_native": False, "cpu_native_a8": True}  # backend -> int8 activations


class NativeLinear(nn.Module):
    """A ``QLinear`` on lowbit's C kernels through ``torch.ops.lowbit_native.linear`` (no Python between a
    compiled graph and the kernel) up to the layer's GEMV row limit (``cpu_native.gemv_rows``); more rows
    run the layer itself (tiled), as its own forward would."""

    def __init__(self, layer: QLinear, a8: bool) -> None:
        super().__init__()
        self.layer, self.a8, self.out_features = layer, a8, layer.out_features
        self.max_rows = gemv_rows(layer)
        args = torch_ops.static_args(layer)
        self.register_buffer("lut", args.pop("lut"), persistent=False)
        self.register_buffer("bias32", bias32(layer), persistent=False)
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > self.max_rows:
            return self.layer(x)
        q = self.layer
        y = torch.ops.lowbit_native.linear(
            x.float().contiguous(),
            q.qweight,
            q.scale,
            q.zero_point,
            self.lut,
            self.bias32,
            **self.args,
            a8=self.a8,
        )
        return y.to(x.dtype)


def _native(layer: QLinear) -> nn.Module:
    """``layer`` wrapped in ``NativeLinear`` where it runs lowbit's C kernels at decode, else itself."""
    cpu = torch.device("cpu")
    name = layer.backend or select(layer.KERNEL_OP, layer, cpu).name
    if name not in NATIVE or getattr(layer, "routes", None) or not torch_ops.available():
        return layer
    return NativeLinear(layer, NATIVE[name])


class Fused(nn.Module):
    """Linears sharing one input: ``forward(x)`` -> their outputs, as one stacked call where possible."""

    def __init__(self, parts: list[nn.Module], backend: str | None = None, fuse: bool = True) -> None:
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        if fuse and _stackable(parts):
            stacked = _stack(parts, None)
            stacked.backend = _runnable(stacked, backend)
            self.parts = nn.ModuleList([_native(stacked)])
        else:
            views = [_native(_view(p, _runnable(p, backend))) if type(p) is QLinear else p for p in parts]
            self.parts = nn.ModuleList(views)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.parts) == 1:
            return self.parts[0](x).split(self.sizes, dim=-1)
        return tuple(p(x) for p in self.parts)


def single(layer: nn.Module, backend: str | None = None) -> nn.Module:
    """``layer`` itself, or for a ``QLinear`` a view of it that runs ``backend``."""
    return _native(_view(layer, _runnable(layer, backend))) if type(layer) is QLinear else layer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    """One decoder layer; ``forward(h, cos, sin, k_cache, v_cache, positions, mask)`` -> new ``h``.

    ``h (1, T, hidden)``; ``cos``/``sin (1, T, head_dim)``; caches ``(1, kv_heads, L, head_dim)``, written
    at ``positions (T,)``; ``mask`` None (causal over the first T slots, the prompt) or a bool ``(T, L)``
    (True: attend)."""

    def __init__(self, layer: nn.Module, arch: Arch, backend: str | None, fuse: bool) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.arch = arch
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = Fused([attn.q_proj, attn.k_proj, attn.v_proj], backend, fuse)
        self.o = single(attn.o_proj, backend)
        self.gate_up = Fused([mlp.gate_proj, mlp.up_proj], backend, fuse)
        self.down = single(mlp.down_proj, backend)
        self.act = mlp.act_fn

    def attend(self, x, cos, sin, k_cache, v_cache, positions, mask) -> torch.Tensor:
        a = self.arch
        t = x.shape[1]
        q, k, v = self.qkv(x)
        q = q.view(1, t, a.heads, a.head_dim).transpose(1, 2)
        k = k.view(1, t, a.kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(1, t, a.kv_heads, a.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
        v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
        gqa = a.heads != a.kv_heads
        if mask is None:  # the prompt from slot 0: causal over its own slots, as the plain forward does
            keys, values = k_cache[:, :, :t], v_cache[:, :, :t]
            o = F.scaled_dot_product_attention(
                q, keys, values, is_causal=t > 1, scale=a.scaling, enable_gqa=gqa
            )
        else:
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, mask, scale=a.scaling, enable_gqa=gqa)
        return self.o(o.transpose(1, 2).reshape(1, t, a.heads * a.head_dim))

    def forward(self, h, cos, sin, k_cache, v_cache, positions, mask) -> torch.Tensor:
        h = h + self.attend(self.norm1(h), cos, sin, k_cache, v_cache, positions, mask)
        g, u = self.gate_up(self.norm2(h))
        return h + self.down(self.act(g) * u)
