"""Distributed GPTQ on CPU: 1 rank against 2 gloo ranks of one thread each, streamed (``lowbit quantize
--streaming --distributed`` under ``torchrun``), on SmolLM2-135M and Qwen2.5-0.5B.

Each variant is one ``torchrun --standalone --nproc-per-node N`` launch with ``OMP_NUM_THREADS=1``:

| column            | what                                                                                 |
|-------------------|--------------------------------------------------------------------------------------|
| wall s            | the whole launch (processes, imports, reading, quantizing, writing), median of rounds |
| quantize s        | ``quantize_seconds`` of rank 0 (``quantize_folder``: reading, quantizing, writing)   |
| peak RSS / rank   | ``ru_maxrss`` of each rank at the end                                                |
| collective / block| bytes each rank sent plus received in collectives, divided by the number of blocks  |
| same checkpoint   | the 2-rank checkpoint's tensors equal the 1-rank one's, bit for bit                  |

Rounds are interleaved (1 rank, 2 ranks, next model, ...); the 1-minute load average is recorded
before and after each launch. If the checkpoints differ, both are evaluated (``lowbit eval``, wiki
perplexity, 8192 tokens) and the perplexities recorded.
Writes benchmarks/results/distributed_gptq.{json,md}. Needs ``make qwen`` for Qwen2.5-0.5B.
Run: make bench-dist, or .venv/bin/python benchmarks/distributed_gptq.py --rounds 3 --calib wiki:32x512
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RESULTS = Path(__file__).parent / "results"


def _launch(model: str, ranks: int, calib: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd += ["-m", "lowbit.cli", "quantize", "--model", model, "--scheme", "w4g128", "--method", "gptq"]
    cmd += ["--calib", calib, "--streaming", "--distributed", "--overwrite", "--quiet", "--json"]
    cmd += ["--out", str(out)]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{model} with {ranks} rank(s) failed:\n{res.stderr[-4000:]}")
    result = json.loads(res.stdout[res.stdout.index("{") :])
    blocks = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    return {
        "wall_s": round(wall, 1),
        "quantize_s": result["quantize_seconds"],
        "peak_rss_mib": [round(k / 1024) for k in result["peak_rss_kib"]],
        "collective_mb_per_block": [round(b / blocks / 1e6, 2) for b in result["collective_bytes"]],
        "blocks": blocks,
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _same(a: Path, b: Path) -> dict:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    differ = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    out = {"identical": not differ and ta.keys() == tb.keys(), "tensors_differing": len(differ)}
    if differ:
        for name, path in (("ppl_1_rank", a), ("ppl_2_ranks", b)):
            cmd = [sys.executable, "-m", "lowbit.cli", "eval", str(path), "--json", "--quiet"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[name] = round(json.loads(res.stdout)["perplexity"], 4)
    return out


def _same_text(same: dict) -> str:
    if same["identical"]:
        return "bit-identical"
    return (
        f"no: {same['tensors_differing']} tensors differ; perplexity {same['ppl_1_rank']} (1 rank), "
        f"{same['ppl_2_ranks']} (2 ranks)"
    )


def _table(rows: dict, calib: str) -> str:
    lines = [
        f"GPTQ w4g128, calibration {calib}, streamed, one thread per rank; median of the rounds shown.",
        "",
        "| model | rounds | ranks | wall s | quantize s (min-max) | speed-up | peak RSS / rank MiB "
        "| collective MB / block / rank | same checkpoint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in rows.items():
        one = r["1"]["quantize_s"]
        for ranks in ("1", "2"):
            v = r[ranks]
            same = "" if ranks == "1" else _same_text(r["same"])
            times = [x["quantize_s"] for x in v["rounds"]]
            spread = f"{min(times)}-{max(times)}"
            lines.append(
                f"| {model} | {r['n_rounds']} | {ranks} | {v['wall_s']} | {v['quantize_s']} ({spread}) "
                f"| {one / v['quantize_s']:.2f}x "
                f"| {' / '.join(map(str, v['peak_rss_mib']))} "
                f"| {' / '.join(map(str, v['collective_mb_per_block'])) or '0'} | {same} |"
            )
    return "\n".join(lines)


def _measure(models: list[str], calib: str, rounds: int) -> dict:
    """Interleaved launches; per model the medians, every round, and the 1 vs 2 rank comparison."""
    runs: dict = {m: {"1": [], "2": []} for m in models}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-dist-") as tmp:
        for k in range(rounds):
            for model in models:
                for ranks in ("1", "2") if k % 2 == 0 else ("2", "1"):
                    run = _launch(model, int(ranks), calib, Path(tmp) / f"{model}-{ranks}")
                    runs[model][ranks].append(run)
                    print(f"round {k} {model} ranks {ranks}: {run}", flush=True)
        for model in models:
            rows[model] = {"same": _same(Path(tmp) / f"{model}-1", Path(tmp) / f"{model}-2")}
            for ranks, rs in runs[model].items():
                med = {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "quantize_s")}
                rows[model][ranks] = {**rs[0], **med, "rounds": rs}
            rows[model]["n_rounds"] = rounds
    return rows


def _write_md(doc: dict) -> str:
    md = _table(doc["results"], doc["calib"])
    (RESULTS / "distributed_gptq.md").write_text(
        "# Distributed GPTQ, 1 vs 2 gloo ranks\n\n" + md + "\n\nCommand: `make bench-dist` "
        "(`.venv/bin/python benchmarks/distributed_gptq.py --models smollm2-135m --rounds 3`, then "
        "`--models qwen2.5-0.5b --rounds 2`). Per-round numbers and load averages (the 1-minute load "
        "average includes the benchmark's own ranks: 2 busy processes raise it towards 2; nothing else "
        "ran): distributed_gptq.json.\n"
    )
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    p.add_argument("--calib", default="wiki:32x512")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (1 rank, 2 ranks) per model")
    p.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON results")
    args = p.parse_args()
    path = RESULTS / "distributed_gptq.json"
    if args.table:
        print(_write_md(json.loads(path.read_text())))
        return
    rows = _measure(args.models, args.calib, args.rounds)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    machine |= {"torch": torch.__version__, "python": platform.python_version()}
    RESULTS.mkdir(exist_ok=True)
    if path.is_file():  # models not run now keep their results from a run with the same calibration
        prev = json.loads(path.read_text())
        if prev["calib"] == args.calib:
            rows = {**{m: r for m, r in prev["results"].items() if m not in rows}, **rows}
    doc = {"calib": args.calib, "machine": machine, "results": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(_write_md(doc))


if __name__ == "__main__":
    main()
