"""``lowbit`` command line: thin wrappers over ``lowbit.workflows``.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lowbit.core.errors import LowbitError
from lowbit.reporting.summary import summary_lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize neural networks and measure the result.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("--model", required=True, help="bundled name (smollm2-135m), HF folder or .gguf file")
    q.add_argument(
        "--scheme",
        required=True,
        help="w<bits>[g<group>][-sym|-asym] (w8, w4g128), w8a8, w8a8-static, w4a8-static; with --method qat "
        "w<bits>[a<bits>] (w4a4, w2a2; weight bits 1 = binary, t = ternary: w1a8, wta8); plan:FILE applies "
        "a mixed-precision plan.json of lowbit autotune",
    )
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--include", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    q.add_argument("--exclude", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    q.add_argument(
        "--method",
        help="rounding method: rtn (default), hqq (no data); gptq, awq, awq+gptq (weight-only schemes, "
        "need --calib); smoothquant (w8a8, needs --calib); adaround, brecq (learned rounding of "
        "w<b>a8-static, layer by layer or block by block against the float model on --calib); "
        "qat (quantization-aware training on --calib: "
        "labels plus distillation from the float model for mnist/fashion-mnist, distillation for photos; "
        "with wiki:NxL, a decoder's weight-only scheme trained block by block against the float blocks)",
    )
    q.add_argument(
        "--calib",
        help="calibration data: wiki:NxL (N samples of L tokens of Wikipedia, e.g. wiki:128x512; for "
        "language models) or SOURCE:N with SOURCE photos, mnist, fashion-mnist, sentences; your own: "
        "text:FILE[:NxL], jsonl:FILE:FIELD[:NxL], images:DIR[:N] (JPEG/PNG, preprocessed as the model's "
        "inputs), tensors:FILE.safetensors (each tensor one batch)",
    )
    q.add_argument(
        "--streaming",
        action="store_true",
        help="for models larger than memory: read, quantize and stage one decoder block at a time from "
        "the fp32 safetensors (bundled name, .gguf via its cache, or HF folder); rerun the same command "
        "after an interruption to resume from the last finished block",
    )
    q.add_argument(
        "--distributed",
        action="store_true",
        help="run as one rank of a torchrun launch (torchrun --nproc-per-node N $(which lowbit) quantize "
        "... --distributed): the ranks share the calibration forwards and the rounding, rank 0 writes",
    )
    q.add_argument("--observer", help="w8a8-static: minmax, moving_average, percentile, kl or mse")
    q.add_argument("--steps", type=int, help="--method qat: training steps (default 1000)")
    q.add_argument(
        "--lr",
        type=float,
        help="--method qat: peak learning rate (default 1e-3; language models: of the weights)",
    )
    q.add_argument(
        "--batch-size", type=int, help="--method qat: images per step (default 128; language models: samples)"
    )
    q.add_argument("--epochs", type=int, help="--method qat with --calib wiki:NxL: passes per decoder block")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    x = sub.add_parser(
        "export", help="export a checkpoint for another runtime (ONNX QDQ, GGUF, compressed-tensors, TFLite)"
    )
    x.add_argument("model", help="lowbit checkpoint folder")
    x.add_argument(
        "--format",
        default="onnx",
        help="onnx (QDQ, runs in ONNX Runtime); gguf (llama.cpp: Q8_0 from w8g32-sym, "
        "Q4_0 from w4g32-sym, Q4_1 from w4g32; Llama-family models read from a GGUF file); "
        "compressed-tensors (a folder Hugging Face transformers and vLLM load: int4/int8 weight-only, "
        "W8A8); tflite (static int8 CNNs, run by LiteRT)",
    )
    x.add_argument("--out", required=True, help="output file (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.add_argument("--json", action="store_true", help="print the result as JSON")
    e = sub.add_parser("eval", help="evaluate a model or a quantized checkpoint")
    e.add_argument("model", help="lowbit checkpoint folder, bundled name, HF folder or .gguf file")
    e.add_argument(
        "--task",
        default="wiki-ppl",
        help="wiki-ppl: perplexity on held-out Wikipedia; mnist, fashion-mnist: top-1 accuracy on the test "
        "split; photos: top-1 agreement with the float model on 480 photo crops; ppl:FILE: perplexity on "
        "your text; accuracy:DIR: top-1 accuracy on your images, one folder per class (DIR/<class index>/)",
    )
    e.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    e.add_argument("--window", type=int, default=512, help="context window in tokens (default 512)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument(
        "--no-verify",
        action="store_true",
        help="skip a checkpoint's sha256 checks (faster; structure still checked)",
    )
    b = sub.add_parser(
        "bench", help="time a quantized model against its float twin, layer by layer and end to end"
    )
    b.add_argument("model", help="lowbit checkpoint folder (timed as saved) or a float model reference")
    b.add_argument("--scheme", help="for a float model: the scheme to quantize it with (default w4g128)")
    b.add_argument("--prompt", type=int, default=128, help="prompt tokens for prefill (default 128)")
    b.add_argument("--new", type=int, default=32, help="generated tokens for decode (default 32)")
    b.add_argument("--no-layers", action="store_true", help="skip the per-layer backend table")
    b.add_argument("--advice", action="store_true", help="route layers by this machine's cached advice")
    b.add_argument(
        "--decoder",
        choices=("fast", "hf"),
        default="fast",
        help="generation path: fast = lowbit.decode (static KV cache, prompt and steps as one C call each, "
        "or a compiled step; falls back to the model's forward for an unknown architecture), hf = the "
        "model's own forward (default fast)",
    )
    b.add_argument(
        "--dot",
        choices=("float", "int8"),
        default="float",
        help="fast path's dot products: float (exact) or int8 activations per 32 values, as llama.cpp "
        "(default float)",
    )
    a = sub.add_parser("advise", help="measure the fastest scheme and backend per layer shape and batch size")
    a.add_argument("model", help="model reference or checkpoint: its Linear shapes are measured")
    a.add_argument("--schemes", nargs="+", default=["w8", "w4g128", "w8a8"], help="schemes to compare")
    a.add_argument("--refresh", action="store_true", help="measure again what the cache already has")
    t = sub.add_parser("autotune", help="choose each layer's weight format under a budget (mixed precision)")
    _autotune_args(t)
    r = sub.add_parser(
        "report", help="measure a quantized model against its float baseline: HTML, JSON, card"
    )
    _report_args(r)
    g = sub.add_parser("debug", help="find the layer that broke: output SQNR layer by layer against float")
    g.add_argument("model", help="lowbit checkpoint folder, or a QDQ .onnx model (with --float)")
    g.add_argument("--baseline", help="float model to compare with (default: the checkpoint's source)")
    g.add_argument("--float", dest="float_onnx", help="for a QDQ .onnx model: its float .onnx model")
    g.add_argument("--data", help=DATA_HELP)
    g.add_argument("--threshold", type=float, default=20.0, help="output SQNR in dB (default 20)")
    for s in (b, a):
        s.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="activation rows")
        s.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    for s in (q, e, b, a, t, r, g):
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    for s in (b, a, t, r, g):
        s.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _autotune_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--model", required=True, help="bundled name (smollm2-135m), HF folder or .gguf file")
    t.add_argument("--calib", required=True, help="calibration text, wiki:NxL (e.g. wiki:32x512)")
    t.add_argument("--out", required=True, help="output folder of the chosen model (written atomically)")
    t.add_argument("--max-size", help="budget: stored bytes of the planned layers (e.g. 60MB, 1.5GiB)")
    t.add_argument("--bits", type=float, help="budget: bits per weight over the planned layers (3.375)")
    t.add_argument(
        "--max-ppl-increase", help="budget: perplexity increase over the float model, e.g. 5%% or 0.05"
    )
    t.add_argument(
        "--max-latency",
        help="budget: summed per-token latency of the planned Linears on this machine (e.g. 8ms, 800us; "
        "from the lowbit advise cache, measured now where it has none)",
    )
    t.add_argument(
        "--candidates",
        help="formats each layer may take, comma-separated: w<bits>[g<group>][-sym], or nf4, fp4, fp8, log2, "
        "ternary with an optional g<group> (default w2g64,w3g128,w3g64,w4g128,w4g64,w5g128,w6g128,w8)",
    )
    t.add_argument("--base", default="w4g128", help="scheme of layers not planned (tied, excluded from plan)")
    t.add_argument("--method", default="awq+gptq", help="rounding method of the plan (default awq+gptq)")
    t.add_argument("--include", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    t.add_argument("--exclude", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    t.add_argument("--pareto", type=int, default=0, help="also save and evaluate N plans along the frontier")
    t.add_argument("--rounds", type=int, default=1, help="--max-ppl-increase: measured correction rounds")
    t.add_argument(
        "--measure",
        default="fisher",
        choices=["fisher", "measured", "kl"],
        help="layer sensitivity: Fisher-predicted loss (default), or with one layer rounded at a time the "
        "measured loss increase or the KL divergence from the float model's outputs (one pass over --calib "
        "per layer and candidate)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


DATA_HELP = (
    "evaluation data: wiki[:N] (N windows of 512 held-out Wikipedia tokens, default 24), mnist[:N], "
    "fashion-mnist[:N] (test images), photos[:N] (evaluation photo crops), simlex[:N], wordsim[:N] (word "
    "pairs, for sentence encoders); default: the model's own task"
)


def _report_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("model", help="lowbit checkpoint folder, or a float model with --scheme")
    r.add_argument("--out", required=True, help="new report folder: report.html, report.json, MODEL_CARD.md")
    r.add_argument("--baseline", help="float model to compare with (default: the checkpoint's source)")
    r.add_argument("--scheme", help="quantize a float MODEL with this scheme (round to nearest) first")
    r.add_argument("--data", help=DATA_HELP)
    r.add_argument("--groups", help="CSV with columns id,group (sample id 0..N-1 -> group) for the audit")
    r.add_argument(
        "--group-by",
        help="audit grouping: article (wiki), class (mnist, fashion-mnist; photos: the float "
        "model's class), photo (photos); default the first",
    )
    r.add_argument("--no-speed", action="store_true", help="skip the side-by-side speed measurement")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def _fraction(text: str | None) -> float | None:
    """0.05 for "5%" or "0.05"; None stays None."""
    if text is None:
        return None
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise LowbitError(f"bad --max-ppl-increase {text!r}; write e.g. 5% or 0.05") from None


def _run(args: argparse.Namespace) -> dict:
    from lowbit import workflows

    if args.command == "quantize":
        return workflows.quantize_and_save(
            args.model,
            args.scheme,
            args.out,
            method=args.method,
            include=args.include,
            exclude=args.exclude,
            calib=args.calib,
            observer=args.observer,
            streaming=args.streaming,
            overwrite=args.overwrite,
            progress=not args.quiet,
            distributed=args.distributed,
            train={"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs},
        )
    if args.command == "autotune":
        from lowbit.autotune import workflow

        return workflow.run(
            args.model,
            args.out,
            calib=args.calib,
            max_size=args.max_size,
            bits=args.bits,
            max_ppl_increase=_fraction(args.max_ppl_increase),
            max_latency=args.max_latency,
            candidates=args.candidates or None,
            base=args.base,
            method=args.method,
            include=args.include,
            exclude=args.exclude,
            pareto=args.pareto,
            rounds=args.rounds,
            measure=args.measure,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    if args.command == "report":
        from lowbit.reporting.build import report

        r = report(args.model, args.out, baseline=args.baseline, scheme=args.scheme, data=args.data,
                   groups=args.groups, group_by=args.group_by, speed=not args.no_speed,
                   overwrite=args.overwrite, progress=not args.quiet,
                   command=" ".join(["lowbit", *args.argv]))  # fmt: skip
        return {"report": str(Path(args.out) / "report.html"), "markdown": summary_lines(r)}
    if args.command == "debug":
        from lowbit.reporting.debug import debug

        return debug(args.model, baseline=args.baseline, data=args.data, threshold=args.threshold,
                     float_onnx=args.float_onnx, progress=not args.quiet)  # fmt: skip
    if args.command == "export":
        from lowbit.exporting import export

        return export(args.model, args.format, args.out, overwrite=args.overwrite)
    if args.command == "bench":
        return workflows.bench(
            args.model,
            args.scheme,
            batches=args.batches,
            prompt=args.prompt,
            new=args.new,
            rounds=args.rounds,
            layers=not args.no_layers,
            advice=args.advice,
            progress=not args.quiet,
            decoder=args.decoder,
            dot=args.dot,
        )
    if args.command == "advise":
        return workflows.advise(
            args.model,
            args.schemes,
            batches=args.batches,
            refresh=args.refresh,
            rounds=args.rounds,
            progress=not args.quiet,
        )
    from lowbit.tasks import evaluate

    return evaluate(
        args.model,
        args.task,
        n_tokens=args.tokens,
        window=args.window,
        progress=not args.quiet,
        verify=not args.no_verify,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command a report records
    try:
        result = _run(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    if result.get("rank", 0) == 0:  # one answer per run: rank 0's
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
        elif "markdown" in result:
            print(result["markdown"])
        else:
            print("\n".join(f"{k}: {v}" for k, v in result.items()))
    if "ranks" in result and argv is None:
        _exit_rank()
    return 0


def _exit_rank() -> None:
    """End a torchrun rank whose work is done and written, without interpreter finalization: there, now
    and then, a gloo worker thread still being torn down aborts the process ("terminate called without
    an active exception", exit -6) after a successful run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
