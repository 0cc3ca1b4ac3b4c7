"""Weight-only RTN on SmolLM2-135M across schemes: real bytes on disk and held-out perplexity.

Writes benchmarks/results/rtn_schemes.{json,md}. Every quantized model is saved, loaded back and
evaluated (8,192 held-out Wikipedia tokens, window 512). Run: make bench (or python this file).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit.workflows import compare_schemes, format_rows, rows_to_json

SCHEMES = ["w8", "w4g128", "w4g128e8", "w4g64", "w4g32", "w3g64", "w3g32"]
RESULTS = Path(__file__).parent / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--out", default="out/bench", help="where the checkpoints are written")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = compare_schemes("smollm2-135m", args.schemes, args.out, n_tokens=args.tokens)
    env = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rtn_schemes.json").write_text(json.dumps({"env": env, "rows": rows_to_json(rows)}, indent=1))
    note = (
        "SmolLM2-135M (from a Q4_1 GGUF: weights already on a 4-bit g32 grid, so w4g32 flatters RTN), "
        f"{args.tokens} held-out Wikipedia tokens, window 512. Sizes: real bytes of model.safetensors."
    )
    (RESULTS / "rtn_schemes.md").write_text(f"{note}\n\n{format_rows(rows)}\n\n{json.dumps(env)}\n")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
