"""Perplexity of a causal language model over non-overlapping windows of a token stream."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.core.errors import LowbitError
from lowbit.eval.audit import percentile_interval


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return param.device if param is not None else torch.device("cpu")


def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Float64 (b,): summed next-token NLL (nats) of each row of LongTensor ``windows`` (b, w).

    Each row is scored on its own: position t predicts token t+1, so w-1 tokens per row.
    """
    logits = model(windows).logits  # (b, w, vocab)
    logits = logits[:, :-1].float()
    targets = windows[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (b, w-1), float32
    return nll.double().sum(dim=1)


def _windows(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """LongTensor (n // window, window): ``tokens`` cut into full windows, ragged tail dropped."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise LowbitError(f"tokens must be a 1-D LongTensor, got {shape}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise LowbitError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise LowbitError(f"window must be an integer >= 2, got {window!r}")
    n = tokens.numel() // window
    if n == 0:
        raise LowbitError(f"need at least one full window of {window} tokens, got {tokens.numel()} tokens")
    return tokens[: n * window].long().view(n, window)


def window_nlls(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> torch.Tensor:
    """Float64 ``(n,)``: the summed next-token NLL (nats) of each row of LongTensor ``windows`` ``(n, w)``,
    ``batch_size`` rows per forward pass, each row scored on its own (``window_nll``). The model runs in
    eval mode under ``torch.inference_mode()``; its mode is restored."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LowbitError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _device(model)
    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for batch in batches:
                out.append(window_nll(model, batch.to(device)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def perplexity(
    model: nn.Module, tokens: torch.Tensor, window: int = 512, batch_size: int = 4, progress: bool = False
) -> float:
    """exp(mean next-token NLL) of ``model`` on LongTensor ``tokens`` (n,).

    ``tokens`` is cut into ``n // window`` non-overlapping windows (the ragged tail, fewer than
    ``window`` tokens, is not scored); each window is scored independently (no context carried over),
    ``window - 1`` predicted tokens each, ``batch_size`` windows per forward pass. NLL sums are
    accumulated in float64. ``model(ids).logits`` must be (b, w, vocab), as for any Hugging Face
    causal LM. The model runs in eval mode under ``torch.inference_mode()``; its mode is restored.
    """
    return nll_perplexity(window_nlls(model, _windows(tokens, window), batch_size, progress), window)


def nll_perplexity(nlls: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) from per-window NLL sums ``nlls`` ``(n,)`` of ``window``-token windows
    (``window - 1`` predicted tokens each), as ``window_nlls`` returns them."""
    return math.exp(nlls.sum().item() / (len(nlls) * (window - 1)))


def perplexity_interval(
    nlls: torch.Tensor, window: int, bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """``level`` bootstrap interval of the perplexity whose per-window NLL sums are ``nlls`` ``(n,)``
    (``window_nlls``; ``window - 1`` predicted tokens each): windows resampled with replacement."""
    if nlls.ndim != 1 or len(nlls) == 0:
        raise LowbitError(
            f"nlls must be a non-empty 1-D tensor of per-window NLL sums, got {tuple(nlls.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(nlls), (bootstrap, len(nlls)), generator=gen)
    ppl = torch.exp(nlls.double()[idx].mean(1) / (window - 1))
    tail = (1.0 - level) / 2
    return percentile_interval(ppl, tail, 1.0 - tail)
