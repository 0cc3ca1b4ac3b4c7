"""lowbit's GGUF Q4_0 (GPTQ and AWQ+GPTQ rounding) against llama.cpp's own Q4_0 and its importance-matrix
Q4_0, all measured by llama.cpp's `llama-perplexity` on the same held-out Wikipedia text.

Steps (each skipped when its output is already in --work):
1. llama.cpp from the llama-cpp-python source distribution (`vendor/llama.cpp`), built with cmake and
   ninja: llama-perplexity, llama-quantize, llama-imatrix, llama-bench only.
2. The fp32 SmolLM2-135M (lowbit's cached safetensors) converted by llama.cpp's convert_hf_to_gguf.py.
3. llama.cpp: `llama-quantize f32 Q4_0`; `llama-imatrix` on --calib chunks of 512 tokens of lowbit's
   calibration text, then `llama-quantize --imatrix` to Q4_0.
4. lowbit: Linears `w4g32-sym` (Q4_0's layout) by GPTQ and by AWQ+GPTQ on --calib x 512 tokens of the
   same calibration articles, the tied embedding w8g32-sym (Q8_0, as llama.cpp's Q4_0 keeps it), saved,
   loaded back and exported with `lowbit export --format gguf`.
5. `llama-perplexity -c 512 --chunks N -t 2 --no-repack` on each file, and file sizes. (With weight
   repacking on, this build's llama-perplexity crashed with SIGSEGV on Q4_0 files on the 2-core Intel Xeon
   test machine; repacking changes the memory layout, not the quantized values.)
SmolLM2's bundled weights come from a Q4_1 GGUF (4-bit, groups of 32): every 4-bit g32 file here starts
from weights already on a 4-bit grid (asymmetric, so not Q4_0's), which flatters all of them alike.
Usage: python benchmarks/gguf_llamacpp.py [--work DIR] [--chunks N] [--calib N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-perplexity", "llama-quantize", "llama-imatrix", "llama-bench")


def run(cmd: list, log: Path, **kw) -> str:
    """Run ``cmd``; its output goes to ``log``; ``RuntimeError`` with the log's tail if it fails."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    return p.stdout + p.stderr


def build(work: Path) -> tuple[Path, Path]:
    """(bin folder, llama.cpp source folder), building what is missing."""
    src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", work, SDIST],
            work / "download.log")  # fmt: skip
        run(["tar", "xzf", next(work.glob("llama_cpp_python-*.tar.gz")), "-C", work], work / "untar.log")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    out = work / "build"
    if not all((out / "bin" / t).exists() for t in TARGETS):
        run(["cmake", "-S", src, "-B", out, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF"], work / "cmake.log")  # fmt: skip
        run(["ninja", "-C", out, "-j2", *TARGETS], work / "ninja.log")
    return out / "bin", src


def texts(work: Path, calib_chunks: int) -> tuple[Path, Path]:
    """The held-out evaluation articles and the calibration articles as text files."""
    from lowbit.data.tokens import SEPARATOR
    from lowbit.data.wiki import calib_articles, eval_articles

    ev, cal = work / "wiki_eval.txt", work / "wiki_calib.txt"
    ev.write_text(SEPARATOR.join(eval_articles()))
    cal.write_text(SEPARATOR.join(calib_articles()))
    return ev, cal


def llama_files(bins: Path, src: Path, work: Path, calib: Path, chunks: int) -> dict[str, Path]:
    """llama.cpp's f32, Q4_0 and imatrix Q4_0 files of SmolLM2."""
    from lowbit.models import cache_root

    folder = cache_root() / "smollm2-135m"
    if not (folder / "model.safetensors").is_file():
        import lowbit

        lowbit.models.load("smollm2-135m", progress=False)  # writes the cache
    f32, q40, qim, imat = (work / n for n in ("f32.gguf", "llama-q4_0.gguf", "llama-q4_0-imatrix.gguf",
                                               "imatrix.gguf"))  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(src / "gguf-py")}
    if not f32.exists():
        run([sys.executable, src / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", f32],
            work / "convert.log", cwd=src, env=env)  # fmt: skip
    if not q40.exists():
        run([bins / "llama-quantize", f32, q40, "Q4_0", "2"], work / "quantize.log")
    if not imat.exists():
        run([bins / "llama-imatrix", "-m", f32, "-f", calib, "-c", "512", "--chunks", chunks, "-t", "2",
             "-o", imat], work / "imatrix.log")  # fmt: skip
    if not qim.exists():
        run([bins / "llama-quantize", "--imatrix", imat, f32, qim, "Q4_0", "2"], work / "quantize_im.log")
    return {"fp32 (llama.cpp convert)": f32, "Q4_0 llama.cpp": q40, "Q4_0 llama.cpp + imatrix": qim}


def lowbit_files(work: Path, calib: int) -> dict[str, Path]:
    """lowbit's Q4_0 files: Linears w4g32-sym (Q4_0) by GPTQ or AWQ+GPTQ, the tied embedding and LM head
    w8g32-sym (Q8_0, as llama.cpp's Q4_0 keeps them), saved, reloaded and exported."""
    import lowbit
    from lowbit.data import calib_batches
    from lowbit.exporting import export

    out = {}
    for method in ("gptq", "awq+gptq"):
        ck, gg = work / f"lowbit-{method}", work / f"lowbit-q4_0-{method}.gguf"
        if not gg.exists():
            model, tok = lowbit.models.load("smollm2-135m", progress=False)
            config = lowbit.WeightOnly(bits=4, group_size=32, symmetric=True, method=method,
                                       embedding_bits=8, embedding_group_size=32)  # fmt: skip
            t0 = time.perf_counter()
            lowbit.quantize_(model, config, calib_batches(tok, calib, 512))
            print(f"lowbit {method}: {time.perf_counter() - t0:.0f} s", flush=True)
            lowbit.save(model, ck, tokenizer=tok, overwrite=True)
            export(ck, "gguf", gg, overwrite=True)
        out[f"Q4_0 lowbit {method}"] = gg
    return out


def perplexity(bins: Path, model: Path, text: Path, chunks: int, log: Path) -> dict:
    cmd = [bins / "llama-perplexity", "-m", model, "-f", text, "-c", "512", "--chunks", chunks, "-t", "2"]
    out = run([*cmd, "--no-repack"], log)  # see the module docstring
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"no perplexity in {log}")
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)), "bytes": model.stat().st_size}


def speed(bins: Path, model: Path, threads: int, log: Path) -> dict:
    """llama-bench's prefill (128-token prompt) and decode (64 tokens) tokens/s, mean over 5 repetitions;
    weight repacking on (llama.cpp's default) unless it crashes, then off (recorded)."""
    cmd = [bins / "llama-bench", "-m", model, "-p", "128", "-n", "64", "-t", threads, "-r", "5", "-o", "json"]
    for repack in (1, 0):
        try:
            out = run([*cmd, "--repack", repack], log)
        except RuntimeError:
            continue
        tests = json.loads(out[out.index("[") :])
        rate = {("prefill" if t["n_prompt"] else "decode"): t["avg_ts"] for t in tests}
        return {"threads": threads, "repack": bool(repack), **{f"{k}_tok_s": v for k, v in rate.items()}}
    raise RuntimeError(f"llama-bench failed on {model}; see {log}")


def markdown(rows: dict, args) -> str:
    lines = [
        "# SmolLM2-135M as GGUF, perplexity by llama.cpp's llama-perplexity",
        "",
        f"`python benchmarks/gguf_llamacpp.py --chunks {args.chunks} --calib {args.calib}` "
        f"({time.strftime('%Y-%m-%d')}; {SDIST}'s llama.cpp; held-out Wikipedia, context 512, "
        f"{args.chunks} chunks, `--no-repack`; calibration: {args.calib} x 512 tokens of the calibration "
        "articles; lowbit's embedding and llama.cpp's are Q8_0).",
        "SmolLM2's bundled weights already lie on a Q4_1 (asymmetric 4-bit, g32) grid: this flatters every "
        "4-bit row alike.",
        "",
        "Speed: `llama-bench -p 128 -n 64 -r 5` (mean tokens/s of 5 repetitions; weight repacking on unless "
        "it crashed) at 1 and 2 threads, on an idle machine"
        + (
            " (`--speed-only`: timed again, perplexities kept from the run above)."
            if args.speed_only
            else "."
        ),
        "",
        "| file | size (MB) | perplexity (+/- stderr) | prefill tok/s (1 / 2 threads) "
        "| decode tok/s (1 / 2 threads) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        sp = {s["threads"]: s for s in r.get("speed", [])}
        pre = " / ".join(f"{sp[t]['prefill_tok_s']:.0f}" for t in sorted(sp)) or "-"
        dec = " / ".join(f"{sp[t]['decode_tok_s']:.1f}" for t in sorted(sp)) or "-"
        dec += " (repacking crashed: off)" if any(not x["repack"] for x in sp.values()) else ""
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} +/- {r['ppl_stderr']:.3f} | {pre} | {dec} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/gguf-bench", help="build and model folder (kept between runs)")
    p.add_argument("--chunks", type=int, default=60, help="llama-perplexity chunks of 512 tokens")
    p.add_argument("--calib", type=int, default=128, help="calibration samples of 512 tokens")
    p.add_argument("--speed-only", action="store_true", help="keep the perplexities of the last results JSON")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bins, src = build(work)
    ev, cal = texts(work, args.calib)
    files = llama_files(bins, src, work, cal, args.calib) | lowbit_files(work, args.calib)
    if args.speed_only:
        rows = {
            k: {**v, "speed": []}
            for k, v in json.loads((RESULTS / "gguf_llamacpp.json").read_text())["rows"].items()
        }
    else:
        rows = {n: perplexity(bins, f, ev, args.chunks, work / f"ppl-{f.stem}.log") for n, f in files.items()}
    for name, f in files.items():  # after every perplexity run, so the timings see an idle machine
        rows[name]["speed"] = [speed(bins, f, t, work / f"bench-{f.stem}-t{t}.log") for t in (1, 2)]
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "llama.cpp": SDIST,
              "chunks": args.chunks, "calib": args.calib, "rows": rows}  # fmt: skip
    (RESULTS / "gguf_llamacpp.json").write_text(json.dumps(record, indent=1))
    md = markdown(rows, args)
    (RESULTS / "gguf_llamacpp.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
