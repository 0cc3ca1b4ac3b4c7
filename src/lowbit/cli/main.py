"""``lowbit`` command line: thin wrappers over ``lowbit.workflows``.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.core.errors import LowbitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize neural networks and measure the result.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("--model", required=True, help="bundled name (smollm2-135m), HF folder or .gguf file")
    q.add_argument("--scheme", required=True, help="w<bits>[g<group>][-sym|-asym], e.g. w8, w4g128")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--include", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    q.add_argument("--exclude", action="append", default=[], help="module-name glob or re:REGEX (repeatable)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    e = sub.add_parser("eval", help="evaluate a model or a quantized checkpoint")
    e.add_argument("model", help="lowbit checkpoint folder, bundled name, HF folder or .gguf file")
    e.add_argument("--task", default="wiki-ppl", help="wiki-ppl: perplexity on held-out Wikipedia")
    e.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    e.add_argument("--window", type=int, default=512, help="context window in tokens (default 512)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    for s in (q, e):
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run(args: argparse.Namespace) -> dict:
    from lowbit import workflows

    if args.command == "quantize":
        return workflows.quantize_and_save(
            args.model,
            args.scheme,
            args.out,
            include=args.include,
            exclude=args.exclude,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    return workflows.evaluate(
        args.model, args.task, n_tokens=args.tokens, window=args.window, progress=not args.quiet
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
