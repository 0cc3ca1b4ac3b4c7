"""How much each layer's quantization costs: three measures, per layer and candidate format.

- ``frobenius``: the relative weight error ``||W - Q(W)||_F / ||W||_F`` (no data).
- ``fisher``: the loss increase a second-order expansion predicts, ``0.5 * sum F * (W - Q(W))^2`` with
  ``F`` the diagonal empirical Fisher (squared gradients of the per-token loss, ``fisher_diagonals``). In
  nats per token for a language-model loss; additive over layers, which the allocation assumes.
- ``measured``: the loss increase, measured, when only that one layer is quantized (``one_layer_losses``):
  the ground truth the cheap measures are ranked against (Spearman, ``spearman``).
- ``kl``: the mean per-token (per-sample) KL divergence of the output distribution from the float
  model's when only that one layer is quantized (``one_layer_kl``): output-based like ``measured``, but
  never negative and far less noisy on a few samples (no label term that cancels in sign).

``Q`` is round-to-nearest to the candidate's format, whichever method then quantizes the plan (GPTQ and
AWQ lower the error by a factor that differs from layer to layer; the measures do not model it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.rtn import rtn
from lowbit.autotune.candidates import Candidate
from lowbit.core.errors import LowbitError, NonFiniteError

LossFn = Callable[[nn.Module, object], torch.Tensor]  # (model, batch) -> scalar loss
LogitsFn = Callable[[nn.Module, object], torch.Tensor]  # (model, batch) -> logits (..., classes)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy (nats per token) of a Hugging Face causal LM on token ids ``(b, L)``."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def own_label_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's logits ``(b, classes)`` on images ``batch`` against its own top-1
    predictions: no labels needed, and (unlike a KL to itself) a non-zero gradient at the float model, so
    its squared gradients estimate the Fisher of the predicted class."""
    logits = model(batch)
    return nn.functional.cross_entropy(logits, logits.detach().argmax(-1))


def lm_logits(model: nn.Module, batch) -> torch.Tensor:
    """Next-token logits ``(b, L, vocab)`` of a Hugging Face causal LM on token ids ``(b, L)``."""
    return model(input_ids=batch, use_cache=False).logits


def classifier_logits(model: nn.Module, batch) -> torch.Tensor:
    """Logits ``(b, classes)`` of a classifier on ``batch`` (images, or ``(images, labels)``)."""
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


PLANNED_TYPES = (nn.Linear, nn.Conv2d)  # layers a plan gives formats to


def weight_layers(model: nn.Module, select: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The selected ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by fqn, in module order."""
    return {n: m for n, m in model.named_modules() if type(m) in PLANNED_TYPES and select(n)}


def rows_cols(weight: torch.Tensor) -> tuple[int, int]:
    """A weight as the ``(rows, cols)`` matrix its quantized layer stores: ``(out, in * kh * kw)``."""
    return weight.shape[0], weight[0].numel()


class _TokenFisher:
    """Hooks on the ``nn.Linear`` layers of ``layers``: per calibration batch, each layer's weight Fisher
    summed token by token, ``sum_t (T g_t)^2 (x_t)^2`` (``g_t``: gradient of the batch's mean loss w.r.t.
    the layer's output at row ``t``, ``x_t`` its input, ``T`` the batch's rows), an ``(out, in)`` matmul per
    batch: squared per-token gradients, far less noisy than the square of their sum."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.sums = {
            n: torch.zeros_like(m.weight, dtype=torch.float32)
            for n, m in layers.items()
            if type(m) is nn.Linear
        }
        self.rows = dict.fromkeys(self.sums, 0)
        self.handles = [layers[n].register_forward_hook(self._hook(n)) for n in self.sums]

    def _hook(self, name: str):
        def forward(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            rows = x.shape[0]

            def backward(g):
                g2 = (g.detach().reshape(-1, g.shape[-1]).float() * rows).square()
                self.sums[name].addmm_(g2.T, x.square())

            if out.requires_grad:
                self.rows[name] += rows
                out.register_hook(backward)

        return forward

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def fisher_diagonals(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    layers: Mapping[str, nn.Module],
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """fqn -> the diagonal empirical Fisher of ``loss_fn`` w.r.t. that layer's weight (its shape, float32),
    per token or sample of the loss: ``nn.Linear`` layers token by token (``_TokenFisher``, divided by
    all rows seen), other layers as the mean over ``batches`` of the squared weight gradient. Gradients of
    other parameters are not kept; the model is left as it was."""
    params = {n: m.weight for n, m in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    tokens, count = _TokenFisher(layers), 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for batch in tqdm(list(batches), desc="fisher", unit="batch", disable=not progress):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"calibration batch {count}: loss is {float(loss.detach())}")
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, _), g in zip(params.items(), grads, strict=True):
                if n not in tokens.sums:
                    sums[n].add_(g.float().square())
            count += 1
    finally:
        tokens.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if not count:
        raise LowbitError("the calibration set is empty: the Fisher diagonal needs at least one batch")
    token = {n: t / max(tokens.rows[n], 1) for n, t in tokens.sums.items()}
    return {n: token[n] if n in token else s / count for n, s in sums.items()}


def weight_errors(
    layers: Mapping[str, nn.Module],
    candidates: Sequence[Candidate],
    fisher: Mapping[str, torch.Tensor] | None = None,
    scale_dtype: str = "float16",
) -> dict[str, dict[str, dict[str, float]]]:
    """fqn -> candidate name -> {"frobenius": relative error, "fisher": predicted loss increase (with
    ``fisher``)} for every candidate the layer's shape takes (``Candidate.fits``)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n, m in layers.items():
        w = m.weight.detach().float().reshape(rows_cols(m.weight))
        norm = float(w.norm()) or 1.0
        row = {}
        for c in candidates:
            if not c.fits(tuple(w.shape)):
                continue
            err = rtn(w, c.spec(scale_dtype), f"{n}.weight").dequantize() - w
            row[c.name] = {"frobenius": float(err.norm()) / norm}
            if fisher is not None:
                row[c.name]["fisher"] = 0.5 * float((fisher[n].reshape(w.shape) * err.square()).sum())
        out[n] = row
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence, loss_fn: LossFn) -> float:
    """Mean of ``loss_fn`` over ``batches``."""
    return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


@torch.no_grad()
def one_layer_losses(
    model: nn.Module,
    batches: Sequence,
    loss_fn: LossFn,
    layers: Mapping[str, nn.Module],
    candidate: Candidate,
    scale_dtype: str = "float16",
    progress: bool = False,
) -> dict[str, float]:
    """fqn -> measured loss increase over the float model on ``batches`` when only that layer's weight is
    rounded to ``candidate`` (RTN); each weight is restored before the next."""
    base = mean_loss(model, batches, loss_fn)
    return _one_at_a_time(
        layers, candidate, scale_dtype, progress, lambda: mean_loss(model, batches, loss_fn) - base
    )


@torch.no_grad()
def one_layer_kl(
    model: nn.Module,
    batches: Sequence,
    layers: Mapping[str, nn.Module],
    candidate: Candidate,
    scale_dtype: str = "float16",
    logits_fn: LogitsFn = lm_logits,
    progress: bool = False,
) -> dict[str, float]:
    """fqn -> mean over tokens (samples) of ``KL(p_float || p_q)`` in nats on ``batches`` when only that
    layer's weight is rounded to ``candidate`` (RTN); each weight is restored before the next."""
    ref = [torch.log_softmax(logits_fn(model, b).float(), -1) for b in batches]

    def kl() -> float:
        total, count = 0.0, 0
        for b, lp in zip(batches, ref, strict=True):
            lq = torch.log_softmax(logits_fn(model, b).float(), -1)
            total += float((lp.exp() * (lp - lq)).sum(-1).sum())
            count += lp[..., 0].numel()
        return total / max(count, 1)

    return _one_at_a_time(layers, candidate, scale_dtype, progress, kl)


def _one_at_a_time(
    layers, candidate, scale_dtype, progress, measure: Callable[[], float]
) -> dict[str, float]:
    """fqn -> ``measure()`` with only that layer's weight rounded to ``candidate`` (RTN), restored after."""
    out = {}
    for n, m in tqdm(layers.items(), desc=f"one layer at a time ({candidate.name})", disable=not progress):
        keep = m.weight.detach().clone()
        try:
            w = keep.float().reshape(rows_cols(keep))
            m.weight.copy_(rtn(w, candidate.spec(scale_dtype), n).dequantize(keep.dtype).reshape(keep.shape))
            out[n] = measure()
        finally:
            m.weight.copy_(keep)
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        raise LowbitError(f"spearman needs two sequences of the same length >= 2, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else 0.0


def _ranks(x: Sequence[float]) -> torch.Tensor:
    t = torch.tensor(list(x), dtype=torch.float64)
    order = t.argsort()
    ranks = torch.empty_like(t)
    ranks[order] = torch.arange(len(t), dtype=torch.float64)
    for v in t.unique():  # ties share their mean rank
        same = t == v
        ranks[same] = ranks[same].mean()
    return ranks
