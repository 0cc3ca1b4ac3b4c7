"""SmolLM2-135M greedy decode on the CPU, batch 1: lowbit's fast decode path (``lowbit.decode.Decoder``)
against llama.cpp at the same bits, side by side in one run, at each of --threads.

Writes benchmarks/results/decode_llamacpp.{json,md}. Needs the benchmark environment (``make bench-venv``)
and llama.cpp, built (cmake, ninja) and fed by benchmarks/gguf_llamacpp.py's helpers into --work.

Rows (each variant its own copy of the fp32 model; a variant that fails is reported, not skipped):
- llama.cpp f32 / Q8_0 / Q4_0: the fp32 safetensors converted by convert_hf_to_gguf.py, quantized by
  llama-quantize, timed by ``llama-bench -p PROMPT -n NEW -t T -r 2`` (prefill = pp, decode = tg; tg starts
  from an empty cache, lowbit's decode follows the prompt). llama-bench is built for AVX-512 with AMX off
  (``bench_build``: GGML_NATIVE's AMX dies by SIGILL on the 2-core KVM Xeon, and its repacking with it), so
  weight repacking (llama.cpp's default and fastest path) runs; a file on which llama-bench still crashes
  is rerun with ``--repack 0`` from then on, and its row says so.
- lowbit fp32, w8 (per-channel symmetric) and w4g128 through ``Decoder(compile=True)``, the quantized ones
  with ``dot="float"`` and ``dot="int8"`` (int8 activations, like llama.cpp's Q8_0 activations). The
  quantized Decoders run prompt and steps as one C call each (``step`` column: native); the fp32 one
  compiles its step; one more w4g128 int8-dot row runs the torch.compile step (``native=False``), for what
  the C step buys.
- Plain HF ``generate``: fp32 (the reference of ``agree``), lowbit w4g128, torchao int8 weight-only and
  optimum-quanto int8/int4 (benchmarks/decode_cpu.py's variants).
Per round and thread count, every variant runs in turn: prefill of a PROMPT-token held-out Wikipedia prompt
alone (HF: the last position's logits only, as generate's), then prefill + NEW greedy tokens; decode tok/s =
NEW / (the difference), prefill tok/s = PROMPT / prefill; then each llama-bench file once, so that drifts
hit all alike. Medians over rounds; warm-up (torch.compile included, its time reported) excluded.
``agree``: fraction of greedy tokens equal to fp32 HF generate's. Where a Decoder row decodes slower than
llama.cpp at its bits, one step is split by torch.profiler (eager Decoder, 16 steps) into kernels,
attention, cache, other aten ops and Python/dispatch, beside the timed step's wall time; where it prefills
slower, its prefill is split into linears and the rest (``prefill_split``).
Time it on an idle machine (load < 1; the load before and after is recorded).
Run: make bench-speed, or .venv-bench/bin/python benchmarks/decode_llamacpp.py [--work DIR] [--rounds N]
     [--threads 1 2] [--variants NAME ...] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import decode_cpu  # benchmarks/: the peers' variant functions and HF generate
import gguf_llamacpp as gguf  # benchmarks/: llama.cpp build and runner
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import lowbit
from lowbit.data import eval_tokens
from lowbit.decode.layers import NativeLinear

RESULTS = Path(__file__).parent / "results"
LLAMA_REPS = 2  # llama-bench -r per invocation; repeated once per round
SPLIT_STEPS = 16
BUCKETS = (  # first match from the outermost op inwards; an op's self time goes to its bucket
    ("kernels", ("lowbit::", "lowbit_native::", "aten::mm", "aten::addmm", "aten::linear")),
    ("attention", ("scaled_dot_product",)),
    ("cache", ("index_copy_", "aten::copy_", "index_put_", "slice_scatter")),
)


@dataclass(frozen=True)
class Variant:
    quantize: Callable | None  # applied to a copy of the fp32 model
    ref: str  # the llama.cpp row at the same bits
    dot: str | None = None  # the Decoder's dot product; None: plain HF generate
    native: bool = True  # the Decoder may run its step as one C call (else torch.compile)


_PEER = decode_cpu.VARIANTS
VARIANTS = {
    "fp32 HF generate": Variant(None, "llama.cpp f32"),
    "lowbit fp32 Decoder": Variant(None, "llama.cpp f32", "float"),
    "lowbit w8 Decoder float-dot": Variant(_PEER["lowbit w8"], "llama.cpp Q8_0", "float"),
    "lowbit w8 Decoder int8-dot": Variant(_PEER["lowbit w8"], "llama.cpp Q8_0", "int8"),
    "lowbit w4g128 Decoder float-dot": Variant(_PEER["lowbit w4g128"], "llama.cpp Q4_0", "float"),
    "lowbit w4g128 Decoder int8-dot": Variant(_PEER["lowbit w4g128"], "llama.cpp Q4_0", "int8"),
    "lowbit w4g128 Decoder int8-dot, torch.compile step": Variant(
        _PEER["lowbit w4g128"], "llama.cpp Q4_0", "int8", native=False
    ),
    "lowbit w4g128 HF generate": Variant(_PEER["lowbit w4g128"], "llama.cpp Q4_0"),
    "torchao int8 weight-only": Variant(_PEER["torchao int8 weight-only"], "llama.cpp Q8_0"),
    "quanto int8": Variant(_PEER["quanto int8"], "llama.cpp Q8_0"),
    "quanto int4": Variant(_PEER["quanto int4"], "llama.cpp Q4_0"),
}
LLAMA = {  # row: file in --work
    "llama.cpp f32": "f32.gguf",
    "llama.cpp Q8_0": "llama-q8_0.gguf",
    "llama.cpp Q4_0": "llama-q4_0.gguf",
}


def gguf_files(bins: Path, src: Path, work: Path, names: list[str]) -> dict[str, Path]:
    """llama.cpp's f32, Q8_0 and Q4_0 files of SmolLM2 (f32 and Q4_0 named as gguf_llamacpp.py names
    them, so that one --work serves both; the conversion is that script's)."""
    from lowbit.models import cache_root

    folder, f32 = cache_root() / "smollm2-135m", work / LLAMA["llama.cpp f32"]
    if not f32.exists():
        if not (folder / "model.safetensors").is_file():
            lowbit.models.load("smollm2-135m", progress=False)  # writes the cache
        env = os.environ | {"PYTHONPATH": str(src / "gguf-py")}
        script = src / "convert_hf_to_gguf.py"
        convert = [sys.executable, script, folder, "--outtype", "f32", "--outfile", f32]
        gguf.run(convert, work / "convert.log", cwd=src, env=env)
    for name in names:
        out = work / LLAMA[name]
        if not out.exists():
            qtype = name.split()[-1]
            gguf.run([bins / "llama-quantize", f32, out, qtype, "2"], work / f"quantize-{qtype}.log")
    return {n: work / LLAMA[n] for n in names}


NOAMX = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
         "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
         "-DGGML_AVX512_BF16=ON"]  # fmt: skip


def bench_build(work: Path, src: Path, bins: Path) -> Path:
    """The folder of a llama-bench built for this CPU's AVX-512 (VNNI, BF16, VBMI) with AMX left out, into
    work/build-noamx (``bins`` where the CPU has no AVX-512 VNNI). GGML_NATIVE compiles in AMX, which dies by
    SIGILL in a KVM guest not granted AMX state, and its repacked weights (llama.cpp's fast Q4_0/Q8_0 path)
    with it; without AMX the AVX-512 repacking runs."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" not in flags:
        return bins
    out = work / "build-noamx"
    if not (out / "bin" / "llama-bench").exists():
        gguf.run(["cmake", "-S", src, "-B", out, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                  "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                  "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *NOAMX],
                 work / "cmake-noamx.log")  # fmt: skip
        gguf.run(["ninja", "-C", out, "-j2", "llama-bench"], work / "ninja-noamx.log")
    return out / "bin"


def llama_bench(bins: Path, model: Path, threads: int, args, state: dict) -> tuple[float, float]:
    """(prefill, decode) tok/s of one llama-bench invocation. Repacking stays on until llama-bench fails
    with it on this file; then that failure is kept in ``state`` and its log, and repacking is off."""
    log = Path(args.work) / f"bench-decode-{model.stem}-t{threads}.log"
    cmd = [bins / "llama-bench", "-m", model, "-p", args.prompt, "-n", args.new, "-t", threads,
           "-r", LLAMA_REPS, "-o", "json"]  # fmt: skip
    try:
        out = gguf.run([*cmd, "--repack", int(state["repack"])], log)
    except RuntimeError as e:
        if not state["repack"]:
            raise
        code = re.search(r"failed \((-?\d+)\)", str(e))
        sig = signal.Signals(-int(code.group(1))).name if code and int(code.group(1)) < 0 else None
        crash = sig or str(e).splitlines()[0]
        state.update(repack=False, crash=crash, crash_log=str(log.with_suffix(".crash.log")))
        log.replace(state["crash_log"])
        out = gguf.run([*cmd, "--repack", 0], log)
    tests, _ = json.JSONDecoder().raw_decode(out, out.index("["))
    state["commit"] = tests[0].get("build_commit")
    rate = {("prefill" if t["n_prompt"] else "decode"): t["avg_ts"] for t in tests}
    return rate["prefill"], rate["decode"]


def prepare(name: str, base, ids, args):
    """The variant's model, its runner (the model, or a Decoder around it) warmed up at every thread count,
    the seconds of its first warm-up (torch.compile's time for a Decoder) and lowbit's warnings."""
    v = VARIANTS[name]
    model = copy.deepcopy(base)
    if v.quantize is not None:
        v.quantize(model)
    runner = model  # HF generate's
    if v.dot is not None:
        from lowbit.decode import Decoder  # the fast path; a variant error until it exists

        runner = Decoder(model, cache_len=args.prompt + args.new, compile=True, dot=v.dot, native=v.native)
    first = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. the Decoder falling back to eager
        warnings.simplefilter("always")
        for t in args.threads:
            torch.set_num_threads(t)
            s = time.perf_counter()
            time_once(v, runner, ids, args.new)
            first = first if first is not None else time.perf_counter() - s
    notes = sorted({str(w.message)[:300] for w in caught if str(w.message).startswith("lowbit")})
    return model, runner, first, notes


def time_once(v: Variant, runner, ids, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, prefill + NEW tokens seconds, the NEW greedy tokens)."""
    s = time.perf_counter()
    if v.dot is None:
        runner(ids, logits_to_keep=1)  # as generate's own prefill: the last position's logits only
    else:
        runner.prefill(ids)
    prefill = time.perf_counter() - s
    s = time.perf_counter()
    if v.dot is None:
        tokens = decode_cpu._generate(runner, ids, new)
    else:
        tokens = runner.generate(ids, new)[0, ids.shape[1] :]
    return prefill, time.perf_counter() - s, tokens


def _bucket(ev) -> str:
    chain = []
    while ev is not None:
        chain.append(ev.name)
        ev = ev.cpu_parent
    for name in reversed(chain):
        for bucket, keys in BUCKETS:
            if any(k in name for k in keys):
                return bucket
    return "other aten"


class _Range:
    """Forward hooks that open a profiler range named ``name`` before a module's forward, close it after."""

    def __init__(self, name: str) -> None:
        self.name, self.open = name, []

    def enter(self, module, args) -> None:
        self.open.append(record_function(self.name).__enter__())

    def leave(self, module, args, out) -> None:
        self.open.pop().__exit__(None, None, None)


def _annotate(net: torch.nn.Module) -> list:
    """A ``lowbit::<op>`` range around each quantized layer's forward: eager forwards call lowbit's kernels
    through ctypes, unseen by the profiler (compiled ones call them as ``lowbit::`` ops)."""
    handles = []
    for m in net.modules():
        if (op := getattr(m, "KERNEL_OP", None)) is not None:
            r = _Range(f"lowbit::{op}")
            handles += [m.register_forward_pre_hook(r.enter), m.register_forward_hook(r.leave)]
    return handles


def split(model, timed, dot: str, ids, new: int) -> dict[str, float]:
    """Milliseconds per decode step: an eager Decoder's ops' self-CPU time by bucket over up to SPLIT_STEPS
    profiled steps, Python/dispatch = the profiled wall time minus the ops'; the timed Decoder's wall time
    per step (its own engine: one C call or compiled)."""
    from lowbit.decode import Decoder

    steps = min(SPLIT_STEPS, new - 1)
    eager = Decoder(model, cache_len=ids.shape[1] + new, compile=False, dot=dot, native=False)
    tok = eager.step(eager.prefill(ids).argmax(-1, keepdim=True)).argmax(-1, keepdim=True)  # unprofiled
    handles = _annotate(eager.net)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s = time.perf_counter()
        for _ in range(steps):
            tok = eager.step(tok).argmax(-1, keepdim=True)
        wall = (time.perf_counter() - s) * 1e3 / steps
    for h in handles:
        h.remove()
    ms = {b: 0.0 for b, _ in BUCKETS} | {"other aten": 0.0}
    for ev in prof.events():
        if "::" in ev.name:  # ops and the lowbit:: ranges, not other annotations
            ms[_bucket(ev)] += ev.self_cpu_time_total / 1e3 / steps
    ms |= {"Python/dispatch": wall - sum(ms.values()), "eager step": wall}
    tok = timed.prefill(ids).argmax(-1, keepdim=True)
    s = time.perf_counter()
    for _ in range(steps):
        tok = timed.step(tok).argmax(-1, keepdim=True)
    return ms | {"timed step": (time.perf_counter() - s) * 1e3 / steps}


def split_at(row: dict, models: dict, runners: dict, ids, new: int) -> dict:
    """``split`` of a Decoder row, at its thread count."""
    torch.set_num_threads(row["threads"])
    name = row["variant"]
    ms = split(models[name], runners[name], VARIANTS[name].dot, ids, new)
    return {"variant": name, "threads": row["threads"], "engine": runners[name].engine, **ms}


def _median_ms(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1e3


def _replay(lin, x: torch.Tensor) -> torch.Tensor:
    """``lin`` (a ``NativeLinear``) on ``x`` through the kernel the one-call prompt runs, at any row count."""
    q = lin.layer
    return torch.ops.lowbit_native.linear(x, q.qweight, q.scale, q.zero_point, lin.lut, lin.bias32,
                                          **lin.args, a8=lin.a8)  # fmt: skip


def prefill_split(dec, ids) -> dict[str, float]:
    """Milliseconds of one prefill of ``ids`` by Decoder ``dec``: the whole prefill, and its linears alone:
    where the prompt runs as one C call, each linear of the step replayed on as many random rows as the
    prompt has (the kernel that call runs); else the eager prefill under torch.profiler (``kernels``
    bucket). ``other``: the prefill minus its linears (attention, norms, rotary, cache, dispatch)."""
    whole = _median_ms(lambda: dec.prefill(ids))
    rows = ids.shape[1]
    if dec.native_prompt(rows):
        linears = [m for m in dec.net.modules() if isinstance(m, NativeLinear)]
        kernels = sum(_median_ms(partial(_replay, lin, torch.randn(rows, lin.layer.cols))) for lin in linears)
    else:
        handles = _annotate(dec.net)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec.prefill(ids)
        for h in handles:
            h.remove()
        kernels = sum(ev.self_cpu_time_total for ev in prof.events() if "::" in ev.name
                      and _bucket(ev) == "kernels") / 1e3  # fmt: skip
    return {"prefill": whole, "linears": kernels, "other": whole - kernels}


def prefill_split_at(row: dict, runners: dict, ids) -> dict:
    torch.set_num_threads(row["threads"])
    name = row["variant"]
    return {"variant": name, "threads": row["threads"], "engine": runners[name].engine,
            **prefill_split(runners[name], ids)}  # fmt: skip


def summarize(samples: dict, tokens: dict, runners: dict, args) -> list[dict]:
    """One row per (thread count, variant): medians, and ratios to llama.cpp at the same bits."""
    rows = []
    ref = tokens.get("fp32 HF generate")
    for t, per in samples.items():
        llama = {n: (statistics.median(p for p, _ in s), statistics.median(d for _, d in s))
                 for n, s in per.items() if n in LLAMA}  # fmt: skip
        for name, s in per.items():
            if name in LLAMA:
                rows.append({"threads": t, "variant": name, "prefill_tok_s": llama[name][0],
                             "decode_tok_s": llama[name][1]})  # fmt: skip
                continue
            pf, tt = statistics.median(p for p, _ in s), statistics.median(x for _, x in s)
            dec = args.new / max(tt - pf, 1e-9)
            lref = llama.get(VARIANTS[name].ref)
            agree = float((tokens[name] == ref).float().mean()) if ref is not None else None
            rows.append({"threads": t, "variant": name, "prefill_tok_s": args.prompt / pf,
                         "decode_tok_s": dec, "vs_llamacpp": dec / lref[1] if lref else None,
                         "prefill_vs_llamacpp": args.prompt / pf / lref[0] if lref else None,
                         "engine": getattr(runners[name], "engine", "hf"), "agree": agree})  # fmt: skip
    return rows


def measure(runners: dict, files: dict, bins, ids, args) -> tuple[dict, dict, dict]:
    """Interleaved rounds: (samples[threads][variant] = [(a, b), ...], the greedy tokens, llama state)."""
    samples = {t: {n: [] for n in [*runners, *files]} for t in args.threads}
    tokens, state = {}, {n: {"repack": True, "crash": None} for n in files}
    for r in range(args.rounds):
        for t in args.threads:
            torch.set_num_threads(t)
            for name, runner in runners.items():
                pf, tt, tokens[name] = time_once(VARIANTS[name], runner, ids, args.new)
                samples[t][name].append((pf, tt))
            for name, f in files.items():
                samples[t][name].append(llama_bench(bins, f, t, args, state[name]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return samples, tokens, state


def environment(args, state: dict, load_before) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    dists = ("torch", "transformers", "torchao", "optimum-quanto", "lowbit")
    versions = {d: decode_cpu._version(d) for d in dists}
    return {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions | {"python": sys.version.split()[0]},
        "llama.cpp": gguf.SDIST,
        "llama.cpp commit": next((s["commit"] for s in state.values() if s.get("commit")), None),
        "llama-bench": state,
        "llama-bench -r": LLAMA_REPS,
        "cpu": cpu,
        "threads": args.threads,
        "prompt": args.prompt,
        "new": args.new,
        "rounds": args.rounds,
        "load before": load_before,
        "load after": os.getloadavg(),
    }


def _label(name: str, env: dict) -> str:
    """The row's name, with how llama-bench repacked and whether a Decoder fell back to eager."""
    st = env["llama-bench"].get(name)
    if st:
        return name + (" (repack on)" if st["repack"] else f" (repack: {st['crash']}; off)")
    eager = any("compile failed" in w for w in env["warnings"].get(name, ()))
    return name + (" (eager: torch.compile failed)" if eager else "")


def _split_table(title: str, text: str, keys: list[str], splits: list[dict], digits: int) -> list[str]:
    """Markdown lines of a split section: heading, what the columns mean, one row per split."""
    head = ["", f"## {title}", "", text, "", "| variant | threads | engine | " + " | ".join(keys) + " |",
            "|---|---:|---|" + "---:|" * len(keys)]  # fmt: skip
    cells = (" | ".join(f"{s[k]:.{digits}f}" for k in keys) for s in splits)
    return head + [
        f"| {s['variant']} | {s['threads']} | {s['engine']} | {c} |"
        for s, c in zip(splits, cells, strict=True)
    ]


def markdown(
    rows: list[dict], splits: list[dict], prefill_splits: list[dict], errors: dict, env: dict
) -> str:
    out = [
        f"# SmolLM2-135M decode, batch 1: lowbit's Decoder vs llama.cpp ({env['date']})",
        "",
        f"`{env['command']}`: {env['prompt']}-token prompt, {env['new']} greedy tokens, median of "
        f"{env['rounds']} interleaved rounds; llama.cpp rows: `llama-bench -r {env['llama-bench -r']}` per "
        f"round ({env['llama.cpp']}, commit {env['llama.cpp commit']}; tg starts from an empty cache). "
        f"CPU: {env['cpu']}; load before / after: {env['load before'][0]:.2f} / {env['load after'][0]:.2f}.",
        "`vs llama.cpp`: decode tok/s over llama.cpp's at the same bits (f32, Q8_0 for 8-bit, Q4_0 for "
        "4-bit); `prefill vs`: the same for prefill; `step`: how a Decoder ran (native: prompt and steps as "
        "one C call each; compiled: torch.compile step, eager prompt); `agree`: greedy tokens equal to fp32 "
        "HF generate's.",
    ]
    for t in env["threads"]:
        out += ["", f"## {t} thread{'s' * (t > 1)}", "",
                "| variant | step | decode tok/s | prefill tok/s | vs llama.cpp same-bits | prefill vs "
                "| agree |",
                "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in (r for r in rows if r["threads"] == t):
            name = _label(r["variant"], env)
            vs, pvs = (f"{r[k]:.2f}x" if r.get(k) else "-" for k in ("vs_llamacpp", "prefill_vs_llamacpp"))
            agree = f"{r['agree']:.0%}" if r.get("agree") is not None else "-"
            speed = f"{r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f}"
            out.append(f"| {name} | {r.get('engine', '-')} | {speed} | {vs} | {pvs} | {agree} |")
    warm = ", ".join(f"{n} {s:.0f}" for n, s in env["first warm-up s"].items())
    out += [
        "",
        f"First warm-up, excluded (s; for the Decoders torch.compile's time, shorter where inductor's "
        f"on-disk cache holds the kernels from an earlier run): {warm}.",
    ]
    out += [f"\n{n} warned: {w}" for n, ws in env["warnings"].items() for w in ws]
    out += [f"\n{n} failed: {e}" for n, e in errors.items()]
    if splits:
        keys = [*(b for b, _ in BUCKETS), "other aten", "Python/dispatch", "eager step", "timed step"]
        text = (
            f"Eager Decoder under torch.profiler, up to {SPLIT_STEPS} steps: ops' self-CPU time; "
            "Python/dispatch = wall minus ops. kernels: quantized layers' forwards (a `lowbit::` range "
            "each: lowbit's kernels and their own dispatch), aten mm/addmm/linear; attention: "
            "scaled_dot_product; cache: index_copy_/copy_/index_put_/slice_scatter. timed step: the "
            "timed Decoder's wall time (its own engine)."
        )
        out += _split_table(
            "One decode step where lowbit is slower than llama.cpp (ms/token)", text, keys, splits, 2
        )
    if prefill_splits:
        text = (
            "prefill: median of 5 after one warm-up. linears: a native prompt's linears replayed one by one "
            "on as many rows (the kernels that C call runs), or the eager prompt's quantized layers and "
            "matmuls under torch.profiler. other: the rest (attention, norms, rotary, cache, dispatch)."
        )
        title = "One prefill where lowbit is slower than llama.cpp (ms per prompt)"
        out += _split_table(title, text, ["prefill", "linears", "other"], prefill_splits, 1)
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/llamacpp", help="llama.cpp build and GGUF folder (kept)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, *LLAMA], choices=[*VARIANTS, *LLAMA])
    p.add_argument("--skip-llamacpp", action="store_true", help="lowbit and peers only (debugging)")
    args = p.parse_args()
    load_before = os.getloadavg()
    if load_before[0] >= 1:
        print(f"warning: load average {load_before[0]:.2f} >= 1; time on an idle machine", flush=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    files, bins = {}, None
    if not args.skip_llamacpp and (wanted := [n for n in args.variants if n in LLAMA]):
        bins, src = gguf.build(work)
        files = gguf_files(bins, src, work, wanted)
        bins = bench_build(work, src, bins)
    base, tok = lowbit.models.load("smollm2-135m", progress=False)
    ids = eval_tokens(tok, args.prompt)[None, :]
    models, runners, compile_s, notes, errors = {}, {}, {}, {}, {}
    with torch.no_grad():  # not inference_mode: quanto int4 refuses inference tensors
        for name in (n for n in args.variants if n in VARIANTS):
            try:
                models[name], runners[name], compile_s[name], notes[name] = prepare(name, base, ids, args)
            except Exception as e:  # a variant that cannot run is a result, not a crash
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
        del base
        samples, tokens, state = measure(runners, files, bins, ids, args)
        rows = summarize(samples, tokens, runners, args)
        mine = [r for r in rows if r["variant"] in runners and VARIANTS[r["variant"]].dot]
        splits = [split_at(r, models, runners, ids, args.new) for r in mine if (r["vs_llamacpp"] or 1) < 1]
        slow_prefill = [r for r in mine if (r["prefill_vs_llamacpp"] or 1) < 1]
        prefill_splits = [prefill_split_at(r, runners, ids) for r in slow_prefill]
    env = environment(args, state, load_before) | {"first warm-up s": compile_s, "warnings": notes}
    RESULTS.mkdir(exist_ok=True)
    record = {
        "env": env,
        "rows": rows,
        "split_ms": splits,
        "prefill_split_ms": prefill_splits,
        "errors": errors,
    }
    (RESULTS / "decode_llamacpp.json").write_text(json.dumps(record, indent=1))
    md = markdown(rows, splits, prefill_splits, errors, env)
    (RESULTS / "decode_llamacpp.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
