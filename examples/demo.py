"""`make demo`: quantize the bundled SmolLM2-135M to w8, w4g128 and w4g64 and print what it bought.

Size is the real bytes of each saved model.safetensors; perplexity is measured on 8,192 held-out
Wikipedia tokens (window 512) after loading each checkpoint back from disk.
Usage: python examples/demo.py [--tokens N] [--out DIR] [--json FILE]
"""

import argparse
import json
import sys
import time

from lowbit.core.errors import LowbitError
from lowbit.workflows import compare_schemes, format_rows, rows_to_json

SCHEMES = ["w8", "w4g128", "w4g64"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--out", default="out/demo", help="where the quantized checkpoints are written")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args()
    t0 = time.perf_counter()
    try:
        rows = compare_schemes(args.model, SCHEMES, args.out, n_tokens=args.tokens)
    except LowbitError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{args.model}: weight-only round-to-nearest, {args.tokens} held-out Wikipedia tokens, window 512"
    )
    print(format_rows(rows))
    print("Note: SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit, groups of 32), so they already lie")
    print("on a 4-bit grid; w4 results with group 32 would flatter lowbit. g64/g128 and w8 are honest tests.")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_to_json(rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
