"""Block-wise QAT of SmolLM2-135M (``lowbit quantize --method qat``) against AWQ+GPTQ, through the CLI.

Each run is ``lowbit quantize --model smollm2-135m --scheme SCHEME --method METHOD --calib wiki:NxL
--exclude lm_head --exclude model.embed_tokens [--epochs E --lr LR --batch-size B] --out DIR`` (decoder
Linears only: embedding and tied LM head stay float, as the README's SmolLM2 tables), then
``lowbit eval DIR --task wiki-ppl`` (8,192 held-out tokens, window 512; fp32 21.24 on this slice).
Seconds: wall time of the quantize command (loading and saving included); the 1-minute load average
before and after each run is recorded (the machine may be shared: another job's load slows a run).
With ``--streaming`` a run killed by a signal (another job on a shared machine) is started again and
resumes from its staged blocks; each segment's seconds and exit status are recorded, and the wall time
is their sum. Results merge into benchmarks/results/qat_llm.json under ``--key`` (default
``SCHEME-METHOD``).

Run: .venv/bin/python benchmarks/qat_llm.py --scheme w3g64 --method qat --calib wiki:64x512
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "qat_llm.json"
LOWBIT = [sys.executable, "-m", "lowbit.cli"]


def _load() -> float:
    return os.getloadavg()[0]


def run(scheme: str, method: str, calib: str, extra: list[str], out: Path, retries: int) -> dict:
    """Quantize and evaluate one configuration; returns its record."""
    argv = ["quantize", "--model", "smollm2-135m", "--scheme", scheme, "--method", method, "--calib", calib,
            "--exclude", "lm_head", "--exclude", "model.embed_tokens", *extra,
            "--out", str(out), "--overwrite", "--quiet", "--json"]  # fmt: skip
    before, segments = _load(), []
    for _ in range(retries + 1):
        t0 = time.perf_counter()
        done = subprocess.run([*LOWBIT, *argv], capture_output=True, text=True)
        segments.append({"seconds": round(time.perf_counter() - t0, 1), "returncode": done.returncode})
        if done.returncode >= 0:  # finished, or failed by itself: no retry
            break
    seconds = sum(s["seconds"] for s in segments)
    after = _load()
    if done.returncode:
        raise SystemExit(f"quantize failed: {done.stderr.strip()[-2000:]}")
    stats = json.loads(done.stdout)
    ev = subprocess.run([*LOWBIT, "eval", str(out), "--task", "wiki-ppl", "--quiet", "--json"],
                        capture_output=True, text=True, check=True)  # fmt: skip
    return {
        "command": "lowbit " + " ".join(argv[:-5] + ["--out", "DIR"]),
        "perplexity": json.loads(ev.stdout)["perplexity"],
        "wall_seconds": round(seconds, 1),
        "segments": segments,
        "quantize_seconds": stats["quantize_seconds"],
        "load_before": round(before, 2),
        "load_after": round(after, 2),
        "quantized_modules": stats["quantized_modules"],
        "trained": stats.get("trained", {}),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--method", default="qat")
    ap.add_argument("--calib", default="wiki:64x512")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--key", help="name of the record (default SCHEME-METHOD)")
    ap.add_argument("--out", help="checkpoint folder (default: a temporary one, removed)")
    ap.add_argument("--streaming", action="store_true", help="--streaming; rerun a killed run (resumes)")
    args = ap.parse_args()
    extra = ["--streaming"] if args.streaming else []
    for flag, value in (("--epochs", args.epochs), ("--lr", args.lr), ("--batch-size", args.batch_size)):
        extra += [flag, str(value)] if value is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "q"
        record = run(args.scheme, args.method, args.calib, extra, out, retries=10 if args.streaming else 0)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.key or f"{args.scheme}-{args.method}"] = record
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "trained"}, indent=1))


if __name__ == "__main__":
    main()
