"""The measurements of a report, one function per section; each returns a JSON-ready dict.

Quality intervals are 95% bootstrap intervals over the evaluation samples (windows or images), the
difference paired (the same resamples for both models). Speed is measured side by side in interleaved
rounds on this machine at its current thread count; energy is an estimate from counted operations
(``lowbit.eval.energy``), with the RAPL reading beside it where the machine has one.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from lowbit.eval.audit import audit, percentile_interval
from lowbit.eval.energy import count_operations, measured_energy_uj
from lowbit.eval.layers import LayerError
from lowbit.eval.size import size_components, tensor_bytes
from lowbit.reporting.data import WINDOW, EvalData

BOOTSTRAP = 1000
IMAGE_BATCH_ELEMENTS = 600_000  # input values per scoring batch (224x224 RGB: 3 images)


def _row(model: str, value: float, boot: torch.Tensor) -> dict:
    lo, hi = percentile_interval(boot)
    return {"model": model, "value": value, "low": lo, "high": hi}


def scores(model: nn.Module, data: EvalData, progress: bool = False) -> torch.Tensor:
    """Per sample: summed next-token NLL of each window (text), or the logits' top-1 class (images)."""
    from lowbit.eval.accuracy import predict
    from lowbit.eval.perplexity import window_nlls

    if data.kind == "causal-lm":
        return window_nlls(model, data.samples, batch_size=1, progress=progress)
    if data.kind == "embeddings":
        return pair_cosines(model, data)
    # small batches for large images: integer-only layers work on int64 activations that outgrow the cache
    batch = max(1, min(256, IMAGE_BATCH_ELEMENTS // data.samples[0].numel()))
    return predict(model, data.samples, batch_size=batch)


def pair_cosines(model: nn.Module, data: EvalData) -> torch.Tensor:
    """Float64 ``(n,)``: cosine similarity of each word pair's embeddings (``lowbit.models.embed``)."""
    from lowbit.models.encoders import embed

    words = data.words
    index = {w: i for i, w in enumerate(words)}
    v = embed(model, data.tokenizer, words).double()
    a, b = zip(*[(index[p[0]], index[p[1]]) for p in data.samples], strict=True)
    return torch.nn.functional.cosine_similarity(v[list(a)], v[list(b)], dim=1)


def _spearman(cos: torch.Tensor, human: torch.Tensor) -> float:
    """Spearman correlation of ``cos (n,)`` with ``human (n,)`` (ties averaged, scipy)."""
    from scipy.stats import spearmanr

    return float(spearmanr(cos.numpy(), human.numpy()).statistic)


def quality(data: EvalData, base: torch.Tensor | None, quant: torch.Tensor) -> dict:
    """Perplexity (text) or accuracy / top-1 agreement (images) of both models with intervals."""
    n = len(quant)
    idx = torch.randint(0, n, (BOOTSTRAP, n), generator=torch.Generator().manual_seed(0))
    if data.kind == "causal-lm":
        stat = lambda s: torch.exp(s.double()[idx].mean(1) / (WINDOW - 1))  # noqa: E731
        value = lambda s: math.exp(float(s.double().mean()) / (WINDOW - 1))  # noqa: E731
        out = {"task": data.spec, "metric": "perplexity", "higher_is_better": False, "unit": "",
               "samples": n, "sample_unit": f"windows of {WINDOW} tokens"}  # fmt: skip
    elif data.kind == "embeddings":
        human = torch.tensor([p[2] for p in data.samples], dtype=torch.float64)
        stat = lambda c: torch.tensor([_spearman(c[i], human[i]) for i in idx])  # noqa: E731
        value = lambda c: _spearman(c, human)  # noqa: E731
        out = {"task": data.spec, "metric": "Spearman correlation with human similarity scores",
               "higher_is_better": True, "unit": "", "samples": n, "sample_unit": "word pairs"}  # fmt: skip
    else:
        labels = data.labels
        stat = lambda p: (p == labels)[idx].double().mean(1) * 100  # noqa: E731
        value = lambda p: float((p == labels).double().mean()) * 100  # noqa: E731
        metric = "top-1 agreement with the float model" if data.kind == "photos" else "top-1 accuracy"
        out = {"task": data.spec, "metric": metric, "higher_is_better": True, "unit": "%",
               "samples": n, "sample_unit": "images"}  # fmt: skip
    rows = [] if base is None else [_row("baseline", value(base), stat(base))]
    rows.append(_row("quantized", value(quant), stat(quant)))
    out["rows"] = rows
    if base is not None:
        d = stat(quant) - stat(base)
        lo, hi = percentile_interval(d)
        out["delta"] = {"value": value(quant) - value(base), "low": lo, "high": hi}
    if base is not None and data.kind == "classifier":
        agree = (base == quant).double()
        lo, hi = percentile_interval(agree[idx].mean(1) * 100)
        out["extra"] = [{"name": "top-1 agreement with the baseline (%)", "value": float(agree.mean()) * 100,
                         "low": lo, "high": hi}]  # fmt: skip
    return out


def subgroup_audit(data: EvalData, base: torch.Tensor, quant: torch.Tensor, grouping: str) -> dict:
    """``lowbit.eval.audit`` per group of ``grouping``; scores: -NLL per token (text), correct (images)."""
    if data.kind == "causal-lm":
        ref, q = -base / (WINDOW - 1), -quant / (WINDOW - 1)
        score = "negative NLL per token in nats (higher is better)"
    elif data.kind == "embeddings":
        ref, q = _rank_agreement(base, data), _rank_agreement(quant, data)
        score = (
            "-6 d^2 / (n^2 - 1), d: the pair's rank by cosine minus its rank by human score (mean: rho - 1)"
        )
    else:
        ref, q = (base == data.labels).double(), (quant == data.labels).double()
        score = "1 if the top-1 matches the label, else 0 (mean: accuracy)"
    result = audit(ref, q, data.groups[grouping]).to_dict()
    return {"grouping": grouping, "score": score, **result}


def _rank_agreement(cos: torch.Tensor, data: EvalData) -> torch.Tensor:
    """Per pair ``-6 d^2 / (n^2 - 1)``: Spearman's rho is 1 plus their mean (without ties)."""
    from scipy.stats import rankdata

    human = [p[2] for p in data.samples]
    d = torch.tensor(rankdata(cos.numpy()) - rankdata(human), dtype=torch.float64)
    n = len(d)
    return -6 * d.pow(2) / (n * n - 1)


def size(model: nn.Module, baseline: nn.Module | None, layers: list[LayerError]) -> dict:
    """Stored bytes of both models by component, compression and bits per weight of the quantized layers."""
    q_bytes = tensor_bytes(model.state_dict())
    b_bytes = None if baseline is None else tensor_bytes(baseline.state_dict())
    params = sum(e.params for e in layers)
    return {
        "baseline_bytes": b_bytes,
        "quantized_bytes": q_bytes,
        "compression": None if b_bytes is None else b_bytes / q_bytes,
        "bits_per_weight": 8 * sum(e.bytes for e in layers) / params if params else None,
        "components": size_components(model),
        "baseline_components": None if baseline is None else size_components(baseline),
    }


def _one(data: EvalData):
    """One inference: one decoded token (every weight read once), one image or one word."""
    return data.samples[:1, :1] if data.kind == "causal-lm" else data.inputs(1)


def energy(model: nn.Module, baseline: nn.Module | None, data: EvalData) -> dict:
    """Estimated energy per inference of both models, and the RAPL reading where the machine has one."""
    fwd, x = data.forward(), _one(data)
    per = {"causal-lm": "decoded token", "embeddings": "one-word text"}.get(data.kind, "image")
    out = {"per": per, "unit": "uJ"}
    out["quantized"] = count_operations(model, x, fwd).to_dict()
    out["baseline"] = None if baseline is None else count_operations(baseline, x, fwd).to_dict()

    def measured(m):
        with torch.no_grad():
            return measured_energy_uj(lambda: fwd(m, x))

    q = measured(model)
    b = measured(baseline) if baseline is not None and q is not None else None
    out["measured"] = None if q is None else {"quantized_uj": q["package_uj"],
                                               "baseline_uj": b and b["package_uj"]}  # fmt: skip
    return out


def speed(model: nn.Module, baseline: nn.Module | None, data: EvalData, rounds: int = 3) -> dict:
    """Decode and prefill tokens/s (text: 128-token prompt, 16 new tokens) or images/s at batch 1 and 8,
    both models interleaved, median of ``rounds``."""
    models = {"quantized": model} if baseline is None else {"baseline": baseline, "quantized": model}
    threads = torch.get_num_threads()
    if data.kind == "causal-lm":
        from lowbit.eval.bench import end_to_end

        r = end_to_end(models, data.samples[:1, :128], new=16, rounds=rounds)
        measures = [
            ("decode (batch 1)", "tok/s", "decode_tok_s"),
            ("prefill (128 tokens)", "tok/s", "prefill_tok_s"),
            ("weights in memory", "MB", "weights_mb"),
            ("generation peak memory, over the weights", "MB", "generation_peak_mb"),
        ]
        rows = [{"name": n, "unit": u, **{k: v[key] for k, v in r.items()}} for n, u, key in measures]
        return {"threads": threads, "rows": rows, "layers": None}
    from lowbit.eval.latency import compare

    rows, fwd = [], data.forward()
    unit = "texts/s" if data.kind == "embeddings" else "images/s"
    for batch in (1, 8):
        x = data.inputs(batch)
        with torch.no_grad():
            calls = {k: (lambda m=m, x=x: fwd(m, x)) for k, m in models.items()}
            us = compare(calls, rounds=rounds, min_seconds=0.05)
        rows.append({"name": f"batch {batch}", "unit": unit, **{k: batch / v * 1e6 for k, v in us.items()}})
    return {"threads": threads, "rows": rows, "layers": None}


def timed(fn, timings: dict, key: str):
    """``fn()``, its wall time in seconds recorded as ``timings[key]``."""
    t0 = time.perf_counter()
    out = fn()
    timings[key] = round(time.perf_counter() - t0, 2)
    return out
