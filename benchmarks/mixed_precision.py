"""Mixed precision on SmolLM2-135M (``make bench-mixed``): sensitivity measures, plans at the bytes of
uniform schemes, and a Pareto curve, side by side in one run.

Decoder Linears only (embedding and tied LM head float), AWQ+GPTQ rounding for every model, calibration
``wiki:NxL`` (default 64 x 512, as the README's uniform rows), perplexity on the 8,192 held-out tokens
(window 512) of each model after it is saved and reloaded (``lowbit.save`` / ``lowbit.load``).

1. Sensitivity at ``--probe`` (w2g64): the loss increase with only one layer rounded (RTN), measured on
   4 held-out windows (the ground truth), against which four measures are ranked (Spearman): the same
   measurement and the output KL divergence on the first ``--probe-samples`` calibration samples
   (output-based), the Fisher-predicted loss and the relative Frobenius error.
2. Uniform w3g64 and w4g128 (AWQ+GPTQ), and the mixed plans at their planned-layer bytes.
3. The Pareto curve: plans at ``--pareto`` bits per weight, each saved, reloaded and evaluated.

``--model mobilenetv2``: static W8A8 layers with 4- or 8-bit weights (``mobilenetv2``).

Results: benchmarks/results/mixed_precision.{json,md} (SmolLM2 rows), mixed_precision_sensitivity.json
(SmolLM2 step 1), mixed_precision_mobilenetv2.json.
Run: .venv/bin/python benchmarks/mixed_precision.py [--skip-uniform] [--skip-probe | --skip-plans]
[--model mobilenetv2]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import lowbit
from lowbit.autotune import Budget, choose, one_layer_losses, parse_candidates, sensitivity_table, spearman
from lowbit.autotune.candidates import DEFAULT_CANDIDATES, Candidate
from lowbit.autotune.sensitivity import classifier_logits, lm_logits, lm_loss, one_layer_kl
from lowbit.data import calib_batches, eval_tokens
from lowbit.eval.perplexity import perplexity

RESULTS = Path(__file__).parent / "results"
EXCLUDE = ["lm_head", "model.embed_tokens"]


def _evaluate(model, config, calib, tok, tmp: Path, name: str) -> dict:
    """Quantize a copy of ``model`` with ``config``, save, reload, and measure held-out perplexity."""
    import copy

    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    lowbit.quantize_(q, config, calib, exclude=EXCLUDE)
    seconds = time.perf_counter() - t0
    lowbit.save(q, tmp / name, tokenizer=tok)
    del q
    loaded = lowbit.load(tmp / name)
    ppl = perplexity(loaded, eval_tokens(tok, 8192), window=512)
    size = (tmp / name / "model.safetensors").stat().st_size
    return {
        "perplexity": round(ppl, 3),
        "quantize_seconds": round(seconds, 1),
        "file_mb": round(size / 1e6, 2),
    }


def sensitivity(model, table, calib, held, probe: Candidate, loss_fn=lm_loss, logits_fn=lm_logits) -> dict:
    """How well each measure ranks the layers at ``probe``: Spearman of the Fisher-predicted loss, the
    relative Frobenius error and the output-based measures with only that layer rounded, on the
    calibration batches ``calib`` (the loss increase; the output KL divergence from the float model),
    against the one-layer loss increase measured on held-out batches ``held``, the ground truth."""
    layers = {n: model.get_submodule(n) for n in table.names}
    t0 = time.perf_counter()
    scale = "float32" if loss_fn is not lm_loss else "float16"
    truth = one_layer_losses(model, held, loss_fn, layers, probe, scale, progress=True)
    output = one_layer_losses(model, calib, loss_fn, layers, probe, scale, progress=True)
    kl = one_layer_kl(model, calib, layers, probe, scale, logits_fn, progress=True)
    names = list(truth)
    fisher = [table.sensitivity[n][probe.name]["fisher"] for n in names]
    frob = [table.sensitivity[n][probe.name]["frobenius"] for n in names]
    real, out, kls = [truth[n] for n in names], [output[n] for n in names], [kl[n] for n in names]
    return {
        "probe": probe.name,
        "calib_batches": len(calib),
        "held_batches": len(held),
        "layers": len(names),
        "spearman_output": round(spearman(out, real), 4),
        "spearman_output_kl": round(spearman(kls, real), 4),
        "spearman_fisher": round(spearman(fisher, real), 4),
        "spearman_frobenius": round(spearman(frob, real), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_layer": {
            n: {"held_out": truth[n], "output": output[n], "output_kl": kl[n], "fisher": f, "frobenius": r}
            for n, f, r in zip(names, fisher, frob, strict=True)
        },
    }


def _label_loss(model, batch):
    x, labels = batch
    return torch.nn.functional.cross_entropy(model(x), labels)


def mobilenetv2(args) -> None:
    """MobileNetV2, static W8A8 layers with 4- or 8-bit weights per layer, against uniform W8A8 and W4A8:
    top-1 agreement with fp32 on the 480 evaluation crops, run by ONNX Runtime from lowbit's export."""
    import copy

    from learned_rounding import photos_task

    model, _ = lowbit.models.load("mobilenetv2", progress=False)
    model.eval()
    calib, score = photos_task(model)
    with torch.no_grad():  # the float model's own top-1 labels: Fisher and one-layer losses need no labels
        labelled = [(x, model(x).argmax(1)) for x in calib[: args.fisher_batches]]
    if args.fisher_per_sample:  # squared gradients of single crops: the empirical Fisher, not the batch's
        labelled = [(x[i : i + 1], y[i : i + 1]) for x, y in labelled for i in range(len(x))]
    base = lowbit.StaticW8A8(weight_observer=args.weight_observer)
    cands = parse_candidates("w4-sym,w8-sym")
    tables, record = {}, {"command": "python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:])}
    record |= {"calib": "photos:512", "weight_observer": args.weight_observer}
    record["fisher"] = f"{args.fisher_batches} x 32 crops, " + (
        "per crop" if args.fisher_per_sample else "per batch"
    )
    record["load_before"] = os.getloadavg()[0]
    for measure in args.measures.split(","):
        t0 = time.perf_counter()
        tables[measure] = sensitivity_table(
            model,
            labelled,
            cands,
            base=base,
            loss_fn=_label_loss,
            progress=True,
            measure=measure,
            logits_fn=classifier_logits,
        )
        record[f"table_seconds_{measure}"] = round(time.perf_counter() - t0, 1)
    table = next(iter(tables.values()))
    if not args.skip_probe and "fisher" in tables:
        with torch.no_grad():  # the first two Fisher batches; held out: the four after them
            batches = [(x, model(x).argmax(1)) for x in calib[: args.fisher_batches + 4]]
        cand = Candidate(4, None, True)
        probe = sensitivity(
            model, tables["fisher"], batches[:2], batches[-4:], cand, _label_loss, classifier_logits
        )
        record["sensitivity"] = probe
        print({k: v for k, v in probe.items() if k != "per_layer"}, flush=True)
    params = sum(table.params.values())
    rows = []
    for name, config, plan in (
        ("uniform w8a8", base, None),
        ("uniform w4a8", replace(base, weight_bits=4), None),
        *(
            (f"mixed 4/8 at {b} bits ({m})", None, choose(t, Budget(bits=b), base))
            for m, t in tables.items()
            for b in args.mobilenet_bits
        ),
    ):
        config = config or plan.config
        q, t1 = copy.deepcopy(model), time.perf_counter()
        lowbit.quantize_(q, config, calib)
        seconds = time.perf_counter() - t1
        bits = {n: config.layer_bits.get(n, config.weight_bits) for n in table.names}
        code_bits = sum(bits[n] * table.params[n] for n in table.names) / params
        stored = sum(
            cost[[c.bits for c in opts].index(bits[n])]
            for n, opts, cost in zip(table.names, table.options, table.costs, strict=True)
        )
        row = {"name": name, "agreement": round(score(q), 2), "mean_code_bits": round(code_bits, 3)}
        row |= {"bits_per_weight": round(8 * stored / params, 3), "quantize_seconds": round(seconds, 1)}
        if plan is not None:
            row["counts"] = plan.counts()
        rows.append(row)
        print(row, flush=True)
    record |= {"fp32_agreement": 100.0, "rows": rows, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "mixed_precision_mobilenetv2.json").write_text(json.dumps(record, indent=1) + "\n")


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default="64x512", help="calibration samples x tokens")
    ap.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES))
    ap.add_argument("--probe", default="w2g64", help="candidate of the one-layer measurement")
    ap.add_argument("--probe-samples", type=int, default=2, help="calibration samples of the output measures")
    ap.add_argument("--pareto", default="2.5,3.0,6.0,8.1", help="bits per weight of further curve points")
    ap.add_argument("--skip-probe", action="store_true", help="no sensitivity step")
    ap.add_argument(
        "--skip-plans", action="store_true", help="the sensitivity step only (SmolLM2: no uniform/mixed rows)"
    )
    ap.add_argument(
        "--skip-uniform", action="store_true", help="no uniform rows (measured by an earlier run)"
    )
    ap.add_argument("--fisher-samples", type=int, default=16, help="calibration samples of the Fisher")
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "mobilenetv2"])
    ap.add_argument("--fisher-batches", type=int, default=4, help="mobilenetv2: 32-crop batches for Fisher")
    ap.add_argument("--mobilenet-bits", default="5.5,6.0", help="mobilenetv2: bits-per-weight budgets")
    ap.add_argument("--measures", default="fisher", help="mobilenetv2: sensitivity measures (tune.MEASURES)")
    ap.add_argument("--weight-observer", default="minmax", help="mobilenetv2: StaticW8A8.weight_observer")
    ap.add_argument(
        "--fisher-per-batch",
        dest="fisher_per_sample",
        action="store_false",
        help="mobilenetv2: Fisher from 32-crop batch gradients (default: one crop per backward pass)",
    )
    args = ap.parse_args()
    args.mobilenet_bits = [float(b) for b in args.mobilenet_bits.split(",")]
    return args


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.model == "mobilenetv2":
        return mobilenetv2(args)
    n, length = (int(v) for v in args.calib.split("x"))
    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    calib = calib_batches(tok, n, length)
    base = lowbit.WeightOnly(bits=4, group_size=128, method="awq+gptq")
    t0 = time.perf_counter()
    table = sensitivity_table(
        model,
        calib[: args.fisher_samples],
        parse_candidates(args.candidates),
        base=base,
        exclude=EXCLUDE,
        progress=True,
    )
    record = {"command": "python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:]), "fp32": 21.24}
    record["calib"] = f"wiki:{args.calib}"
    record["fisher_samples"] = args.fisher_samples
    record |= {"table_seconds": round(time.perf_counter() - t0, 1), "load_before": os.getloadavg()[0]}
    RESULTS.mkdir(exist_ok=True)
    if not args.skip_probe:
        ev = eval_tokens(tok, 8192)  # one window from each of 4 held-out articles
        held = [ev[i : i + length][None] for i in range(0, 4 * 2048, 2048)]
        probe = parse_candidates(args.probe)[0]
        found = sensitivity(model, table, calib[: args.probe_samples], held, probe, lm_loss)
        print({k: v for k, v in found.items() if k != "per_layer"}, flush=True)
        keep = {k: record[k] for k in ("command", "calib", "fisher_samples", "load_before")}
        found = keep | found | {"finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        (RESULTS / "mixed_precision_sensitivity.json").write_text(json.dumps(found, indent=1) + "\n")
    if args.skip_plans:
        return
    record |= {"rows": _smollm2_rows(model, tok, calib, table, base, args)}
    record |= {"load_after": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "mixed_precision.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "mixed_precision.md").write_text(markdown(record))
    print(markdown(record))


def _smollm2_rows(model, tok, calib, table, base, args) -> list[dict]:
    """Uniform w3g64 / w4g128, the mixed plans at their planned-layer bytes, and the Pareto points."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for bits, group in ((3, 64), (4, 128)):
            uniform = lowbit.WeightOnly(bits=bits, group_size=group, method="awq+gptq")
            planned = 8 * sum(
                Candidate(bits, group).nbytes(tuple(model.get_submodule(n).weight.shape)) for n in table.names
            )
            bpw = planned / sum(table.params.values())
            row = {"name": f"uniform w{bits}g{group}", "bits_per_weight": round(bpw, 4)}
            if not args.skip_uniform:
                rows.append(row | _evaluate(model, uniform, calib, tok, tmp, f"u{bits}"))
            plan = choose(table, Budget(bits=bpw), base)
            row = {"name": f"mixed at w{bits}g{group} bytes", **_plan_facts(plan)}
            rows.append(row | _evaluate(model, plan.config, calib, tok, tmp, f"m{bits}"))
            print(rows[-2:], flush=True)
        for b in (float(x) for x in args.pareto.split(",")):
            plan = choose(table, Budget(bits=b), base)
            row = {"name": f"pareto {b}", "budget_bits": b, **_plan_facts(plan)}
            rows.append(row | _evaluate(model, plan.config, calib, tok, tmp, f"p{b}"))
            print(rows[-1], flush=True)
    return rows


def _plan_facts(plan) -> dict:
    bpw = round(plan.bits_per_weight, 4)
    return {"bits_per_weight": bpw, "counts": plan.counts(), "predicted_loss": plan.predicted_loss}


def markdown(record: dict) -> str:
    lines = [
        "# Mixed precision, SmolLM2-135M decoder Linears (AWQ+GPTQ)",
        "",
        f"`python benchmarks/mixed_precision.py`. Calibration {record['calib']} (Fisher on the first "
        f"{record.get('fisher_samples', 16)} samples); perplexity on 8,192 "
        f"held-out tokens (fp32 {record['fp32']}), each model saved and reloaded. bits/weight: the planned "
        "layers' stored bytes (codes, scales, zero points) x 8 / weights.",
        "",
        "| model | bits/weight | perplexity | file MB | quantize s | formats |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        counts = ", ".join(f"{k} x{v}" for k, v in r.get("counts", {}).items())
        cells = [r["name"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.2f}", f"{r['file_mb']:.1f}"]
        lines.append("| " + " | ".join([*cells, f"{r['quantize_seconds']:.0f}", counts]) + " |")
    path = RESULTS / "mixed_precision_sensitivity.json"
    s = json.loads(path.read_text()) if path.exists() else None
    if s:
        lines += [
            "",
            f"Sensitivity at {s['probe']} ({s['layers']} layers): Spearman rank correlation with the loss "
            f"increase of one layer rounded at a time on {s['held_batches']} held-out windows: output-based "
            f"(the same on {s['calib_batches']} calibration samples) {s['spearman_output']}, output KL "
            f"divergence on those samples {s['spearman_output_kl']}, "
            f"Fisher-predicted {s['spearman_fisher']}, Frobenius {s['spearman_frobenius']} "
            f"(`{s['command']}`, {s['finished']}: `mixed_precision_sensitivity.json`).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
