"""``bench``: a quantized model and its float twin, side by side on this machine.

- layers: every distinct quantized Linear of the model (op, shape, spec), its own weights, timed on each
  backend that can run it against a float32 ``nn.Linear`` of the same shape, per batch size.
- end to end: greedy generation at batch 1: prefill tokens/s (the prompt) and decode tokens/s (new
  tokens after the first), float and quantized alternating round by round, through lowbit's fast decode
  path (``lowbit.decode``: static cache, the step as one C call or compiled; the decoder column says
  which; compilation is part of the warm-up, reported as ``warmup_s``) or the model's own forward;
  weight bytes (real bytes of parameters and buffers, shared ones once); peak memory of generation above
  the resident model, from the kernel's high-water mark (``/proc/self/clear_refs``), Linux only.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lowbit.decode import Decoder, Unsupported
from lowbit.eval.advise import measure_layer
from lowbit.kernels.advice import layer_op


def distinct_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, layer): the first quantized Linear of each distinct (op, shape, spec)."""
    seen, out = set(), []
    for fqn, m in model.named_modules():
        op = layer_op(m)
        if op is None or (op, m.rows, m.cols, m.spec) in seen:
            continue
        seen.add((op, m.rows, m.cols, m.spec))
        out.append((fqn, m))
    return out


def layer_report(model: nn.Module, batches, rounds: int = 5) -> list[dict]:
    """Per distinct quantized layer: microseconds per call of float32 and each backend at each batch."""
    rows = []
    for fqn, m in distinct_layers(model):
        entry = measure_layer(m, batches, rounds=rounds)
        rows.append({"layer": fqn, "shape": f"{m.rows}x{m.cols}", "op": layer_op(m), **entry})
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _generate(model: nn.Module, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds for new - 1 tokens, new tokens) of greedy generation through the
    model's own forward with its dynamic KV cache."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' notice about past_key_values
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, tok, toks = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(new - 1):
            toks.append(tok)
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(tok)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, dim=1)[0]


def _generate_fast(dec: Decoder, ids: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """``_generate`` through a ``lowbit.decode.Decoder`` (static cache, one-call or compiled step)."""
    t0 = time.perf_counter()
    tok, toks = dec.prefill(ids).argmax(-1, keepdim=True), []
    t1 = time.perf_counter()
    for _ in range(new - 1):
        toks.append(tok)
        tok = dec.step(tok).argmax(-1, keepdim=True)
    toks.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat(toks, dim=1)[0]


def _runner(
    model: nn.Module, ids: torch.Tensor, new: int, decoder: str, dot: str
) -> tuple[Callable, str, float]:
    """(generation function, the decoder that runs, warm-up seconds incl. compilation) for ``model``:
    ``decoder="fast"`` takes lowbit.decode where the architecture is known, else the model's forward."""
    t = time.perf_counter()
    if decoder == "fast":
        try:
            dec = Decoder(model, cache_len=ids.shape[1] + new, dot=dot)
        except Unsupported:
            dec = None
        if dec is not None:
            _generate_fast(dec, ids[:, :8], 2)  # compiles the step (unless it runs as one C call)
            return partial(_generate_fast, dec), f"fast ({dec.engine})", time.perf_counter() - t
    _generate(model, ids[:, :8], 2)  # warm-up: kernel builds, first-call allocations
    return partial(_generate, model), "hf", time.perf_counter() - t


def end_to_end(
    models: dict[str, nn.Module],
    ids: torch.Tensor,
    new: int = 32,
    rounds: int = 3,
    decoder: str = "fast",
    dot: str = "float",
) -> dict:
    """Per model: prefill and decode tokens/s (median over alternating rounds), memory, token agreement.
    ``decoder``: "fast" (lowbit.decode, falling back to the model's forward for an unknown architecture)
    or "hf" (the model's forward and dynamic cache); ``dot``: the fast path's dot products."""
    times = {k: ([], []) for k in models}
    tokens, peak, runners = {}, {}, {}
    for k, m in models.items():
        runners[k] = _runner(m, ids, new, decoder, dot)
    for r in range(rounds):
        for k in models:
            before = _rss_kb("VmRSS") if r == 0 and _reset_peak() else None
            p, d, tokens[k] = runners[k][0](ids, new)
            if before is not None:
                peak[k] = max(0, (_rss_kb("VmHWM") or before) - before) / 1024
            times[k][0].append(p)
            times[k][1].append(d)
    first = next(iter(tokens.values()))
    out = {}
    for k, m in models.items():
        p, d = statistics.median(times[k][0]), statistics.median(times[k][1])
        n = min(len(first), len(tokens[k]))
        same = int((first[:n] == tokens[k][:n]).cumprod(0).sum())
        out[k] = {
            "prefill_tok_s": round(ids.shape[1] / p, 1),
            "decode_tok_s": round((new - 1) / d, 2),
            "weights_mb": round(weight_bytes(m) / 1e6, 1),
            "generation_peak_mb": round(peak[k], 1) if k in peak else None,
            "tokens_before_first_divergence": same,
            "decoder": runners[k][1],
            "warmup_s": round(runners[k][2], 1),
        }
    return out


def machine_info() -> dict:
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count()}


def format_report(r: dict) -> str:
    """Markdown of a ``workflows.bench`` result: the layer table, then the end-to-end table."""
    lines = [
        f"{r['model']} ({r['scheme']}), {r['machine']['threads']} threads, torch {r['machine']['torch']}"
    ]
    for row in r.get("layers", []):
        us = row["us"]
        lines += ["", f"{row['layer']} {row['shape']} ({row['op']}): us per call, speedup vs fp32"]
        lines += ["| batch | " + " | ".join(us) + " |", "|---|" + "---:|" * len(us)]
        for i, b in enumerate(row["batches"]):
            fp = us["fp32"][i]
            cells = ["-" if v[i] is None else f"{v[i]:.0f} ({fp / v[i]:.2f}x)" for v in us.values()]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    e2e = r.get("end_to_end")
    if e2e:
        s = r["end_to_end_setup"]
        lines += [
            "",
            f"end to end, batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens:",
        ]
        lines += [
            "| model | decoder | prefill tok/s | decode tok/s | weights MB | generation peak MB "
            "| same tokens |"
        ]
        lines += ["|---|---|---:|---:|---:|---:|---:|"]
        for k, v in e2e.items():
            peak = "-" if v["generation_peak_mb"] is None else f"{v['generation_peak_mb']:.0f}"
            speed = f"{v['prefill_tok_s']:.0f} | {v['decode_tok_s']:.1f}"
            same = v["tokens_before_first_divergence"]
            dec = v.get("decoder", "hf")
            lines.append(f"| {k} | {dec} | {speed} | {v['weights_mb']:.1f} | {peak} | {same} |")
    return "\n".join(lines)
