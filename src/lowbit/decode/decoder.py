"""Fast greedy decoding of Hugging Face decoders (quantized by lowbit or float): static KV cache, one
compiled call per token.

``Decoder(model, cache_len=...)`` wraps a causal LM of a known family (``layers.FAMILIES``). It keeps its own
fused view of the linears (q/k/v and gate/up stacked where their specs agree: copies of those codes, so a
decoder built before the model's weights change runs the old ones; build a new one), a
preallocated KV cache ``(layers, 1, kv_heads, cache_len, head_dim)``, and a decode step that runs every
layer, the final norm and the LM head of one token (its embedding row looked up before) with no Python per
layer. Where every linear is a quantized layer on lowbit's C kernels and the model is float32 with known
norms and activation (``native_step.plan``), the step is one C call (``engine == "native"``,
``native_step.NativeStep``). Otherwise it is compiled once by ``torch.compile(fullgraph=True)``
(``"compiled"``): quantized linears call the C kernels through a C++ operator
(``lowbit.kernels.torch_ops``), other quantized layers through the ``lowbit::`` custom ops
(``lowbit.kernels.ops``). ``native=False`` skips the C step, ``compile=False`` the compilation (``"eager"``).
The prompt is one C call too where the native engine runs and its rows stay within ``NativeStep.max_rows``;
otherwise it runs eagerly through the same modules (its linears take the batched kernels).

``dot="int8"`` runs quantized linears on int8 activation dot products (``cpu_native_a8``: activations
rounded to int8 per 32 values, as llama.cpp's Q8_0 does) where that backend can run them: at every decode
step, and on the prompt where it is one C call (the exact batched kernels otherwise);
``dot="float"`` (default) keeps each layer's own backend, and greedy tokens then equal the plain forward's
(tested; the C step's norms, rotary and attention round differently from torch's in the last bits).
If the cache is too short for a prompt or a step it grows (reallocated, copied; the step recompiles once
for the new length); past the model's ``max_position_embeddings`` it refuses. If ``torch.compile`` is
unavailable or fails, the step runs eagerly, with one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.decode.layers import Block, describe, single
from lowbit.decode.native_step import NativeStep, plan

INT8_DOT = "cpu_native_a8"
DOTS = {"float": None, "int8": INT8_DOT}


class _Step(nn.Module):
    """``forward(h (1, T, hidden), positions (T,), mask) -> logits (1, vocab)`` of the last position."""

    def __init__(self, model: nn.Module, backend: str | None, fuse: bool) -> None:
        super().__init__()
        arch = describe(model)
        inner = model.model
        self.blocks = nn.ModuleList(Block(layer, arch, backend, fuse) for layer in inner.layers)
        self.rotary, self.norm = inner.rotary_emb, inner.norm
        self.head = single(model.lm_head, backend)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self.rotary(h, positions[None])
        for block, k, v in zip(self.blocks, self.k_cache, self.v_cache, strict=True):
            h = block(h, cos, sin, k, v, positions, mask)
        return self.head(self.norm(h[:, -1:]))[:, -1].float()


class Decoder:
    """Greedy generation for one sequence (batch 1) over a static KV cache of ``cache_len`` slots.

    ``prefill(ids (1, P)) -> logits (1, vocab)`` starts a sequence; ``step(token (1, 1))`` appends one;
    ``generate(ids, n)`` -> ``(1, P + n)`` (or shorter if it stops at ``eos_token_id``).
    ``Unsupported`` (a ``LowbitError``) for a model the step does not know; ``lowbit.generate`` then
    falls back to the model's own ``generate``."""

    def __init__(
        self,
        model: nn.Module,
        cache_len: int = 256,
        compile: bool = True,
        dot: str = "float",
        fuse: bool = True,
        native: bool = True,
    ) -> None:
        if dot not in DOTS:
            raise LowbitError(f"dot must be one of {', '.join(DOTS)}, not {dot!r}")
        if cache_len < 1:
            raise LowbitError(f"cache_len must be positive, not {cache_len}")
        self.arch = describe(model)
        self.embed = model.model.embed_tokens
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.net = _Step(model, DOTS[dot], fuse).eval()
        self.native_reason = plan(self.net) if native else "turned off (native=False)"
        self._native: NativeStep | None = None
        self.cache_len, self.pos = 0, 0
        self._grow(min(cache_len, self.arch.max_positions))
        self._compiled = self._compile() if compile and self._native is None else None

    @property
    def engine(self) -> str:
        """How a step runs: "native" (one C call), "compiled" (torch.compile) or "eager"."""
        return "native" if self._native is not None else "compiled" if self._compiled is not None else "eager"

    # ----- cache -----
    def _grow(self, length: int) -> None:
        """Reallocate the caches to ``length`` slots, keeping what they hold."""
        a = self.arch
        if length > a.max_positions:
            raise LowbitError(
                f"{length} positions exceed the model's max_position_embeddings ({a.max_positions})"
            )
        shape = (1, a.kv_heads, length, a.head_dim)
        for cache in (self.net.k_cache, self.net.v_cache):
            old = list(cache)
            cache[:] = [torch.zeros(shape, dtype=self.dtype) for _ in range(a.layers)]
            for new, o in zip(cache, old, strict=False):
                new[:, :, : self.pos].copy_(o[:, :, : self.pos])
        self.cache_len = length
        if self.native_reason is None:
            self._native = NativeStep(self.net, a, self.net.k_cache, self.net.v_cache)

    def _need(self, end: int) -> None:
        """Make room for positions ``[0, end)``: at least double the cache, within the model's limit."""
        if end > self.cache_len:
            limit = self.arch.max_positions
            self._grow(end if end > limit else min(max(end, 2 * self.cache_len), limit))

    # ----- compile -----
    def _compile(self):
        """The step compiled on its own code object: torch.compile keeps compiled versions (and its limit of
        8 recompilations) per code object, and every ``Decoder`` is a new module that guards cannot share
        (its kernels' constants differ), so sharing ``_Step.forward``'s code would let a few decoders, or
        one at a few thread counts, exhaust that limit and silently run eagerly."""
        net = self.net

        def step(h, positions, mask):
            return net(h, positions, mask)

        step.__code__ = step.__code__.replace(co_name=f"lowbit_decode_step_{id(self):x}")
        try:
            return torch.compile(step, fullgraph=True, dynamic=False)
        except Exception as e:  # torch.compile unavailable on this platform
            self._compile_failed(e)
            return None

    def _compile_failed(self, e: BaseException) -> None:
        self._compiled = None
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"lowbit: torch.compile failed ({msg}); the decode step runs eagerly",
            RuntimeWarning,
            stacklevel=3,
        )

    def _run_step(self, h, positions, mask) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(h, positions, mask)
            except Exception as e:  # inductor/dynamo failing on this machine: eager from now on
                self._compile_failed(e)
        return self.net(h, positions, mask)

    # ----- generation -----
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence with prompt ``ids (1, P)``; the logits ``(1, vocab)`` of its last position."""
        ids = self._check_ids(ids)
        self.pos = 0
        self._need(ids.shape[1])
        if self.native_prompt(ids.shape[1]):
            logits = self._native(self._rows(ids), 0)
        else:
            logits = self.net(self.embed(ids), torch.arange(ids.shape[1]), None)
        self.pos = ids.shape[1]
        return logits

    def native_prompt(self, rows: int) -> bool:
        """Whether a prompt of ``rows`` tokens runs as one C call (within ``NativeStep.max_rows``)."""
        return self._native is not None and rows <= self._native.max_rows

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``ids (1, M)`` in a new float32 ``(M, hidden)`` buffer (the C step writes it)."""
        e = self.embed(ids)[0]
        return torch.empty(e.shape, dtype=torch.float32).copy_(e)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token (1, 1)`` at the next position; its logits ``(1, vocab)``."""
        if self.pos == 0:
            raise LowbitError("step() before prefill(): start a sequence with prefill(ids)")
        token = self._check_ids(token).reshape(1, 1)
        self._need(self.pos + 1)
        if self._native is not None:
            logits = self._native(self._rows(token), self.pos)
            self.pos += 1
            return logits
        positions = torch.tensor([self.pos])
        mask = (torch.arange(self.cache_len) <= self.pos)[None, :]
        logits = self._run_step(self.embed(token), positions, mask)
        self.pos += 1
        return logits

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> torch.Tensor:
        """Greedy continuation of ``ids (1, P)``: ``(1, P + n)``, n ≤ ``max_new_tokens`` (stops after an
        ``eos_token_id``, an int or a list, when given)."""
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        ids = self._check_ids(ids)
        self._need(ids.shape[1] + max_new_tokens)
        out = [ids]
        if max_new_tokens <= 0:
            return ids
        tok = self.prefill(ids).argmax(-1, keepdim=True)
        for i in range(max_new_tokens):
            out.append(tok)
            if int(tok) in eos or i == max_new_tokens - 1:
                break
            tok = self.step(tok).argmax(-1, keepdim=True)
        return torch.cat(out, dim=1)

    @staticmethod
    def _check_ids(ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise LowbitError("token ids must be an integer tensor")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise LowbitError(f"token ids must be (1, P) with P >= 1 (batch 1), not {tuple(ids.shape)}")
        return ids.long()


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
    """Greedy ``(1, P + n)`` continuation of ``input_ids (1, P)`` by ``model`` through ``Decoder``
    (``kw``: its options and ``eos_token_id``, default the model's generation config's; ``cache_len``
    defaults to the prompt plus ``max_new_tokens``). A model the fast path does not know runs its own
    ``generate`` instead, with one warning naming its architecture."""
    from lowbit.decode.layers import Unsupported

    eos = kw.pop("eos_token_id", getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    kw.setdefault("cache_len", input_ids.shape[-1] + max_new_tokens)
    try:
        dec = Decoder(model, **kw)
    except Unsupported as e:
        warnings.warn(
            f"lowbit: the fast decode path does not know {e}; using the model's own generate",
            RuntimeWarning,
            stacklevel=2,
        )
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    return dec.generate(input_ids, max_new_tokens, eos_token_id=eos)
