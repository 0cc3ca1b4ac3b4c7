"""Energy estimates and per-class audits of quantized models (``lowbit.eval.energy``, ``lowbit.eval.audit``).

1. Per-class audit: the bundled Fashion-MNIST and MNIST CNNs (``lowbit.models.load``), static W8A8 and
   W4A8 (512 training images to calibrate) against fp32, test accuracy per class on the 10,000 test
   images with 95% bootstrap intervals; classes that lose significantly more than the rest are flagged
   (permutation test, Holm-adjusted, alpha 0.05).
2. Per-article audit: SmolLM2-135M, RTN w4g128 and w3g64 against fp32, perplexity per held-out Wikipedia
   article (each article's first 2,048 tokens in 512-token windows; score: minus the mean NLL per token
   of a window), with 95% bootstrap intervals; articles that lose significantly more are flagged.
3. Energy per inference (45 nm reference energies, module docstring of ``lowbit.eval.energy``): the CNNs
   per image, MobileNetV2 per 224x224 image (fp32, static W8A8), SmolLM2-135M per decoded token (one
   token in, batch 1: fp32, w8, w4g128, w8a8 dynamic; decoder Linears and LM head).

Writes benchmarks/results/energy_audit.{json,md}. Run: .venv/bin/python benchmarks/energy_audit.py
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calib_batches, eval_articles, eval_windows, vision
from lowbit.eval.audit import audit
from lowbit.eval.energy import count_operations
from lowbit.eval.perplexity import nll_perplexity, perplexity_interval, window_nlls
from lowbit.workflows import calibration_batches

RESULTS = Path(__file__).parent / "results"


def _predict(model, images):
    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in images.split(500)])


def cnn_audit(name: str, dataset: str) -> dict:
    model, _ = lowbit.models.load(name, progress=False)
    model.eval()
    calib = calibration_batches(f"{dataset}:512")
    images, labels = vision.DATASETS[dataset]("test")
    ref = (_predict(model, images) == labels).double()
    out = {"fp32": {"accuracy": round(100 * float(ref.mean()), 2)}}
    out["fp32"]["energy"] = count_operations(model, images[:1]).to_dict()
    for scheme, config in (("w8a8", lowbit.StaticW8A8()), ("w4a8", lowbit.StaticW8A8(weight_bits=4))):
        q = copy.deepcopy(model)
        lowbit.quantize_(q, config, calib)
        got = (_predict(q, images) == labels).double()
        result = audit(ref, got, labels.tolist())
        out[scheme] = {
            "accuracy": round(100 * float(got.mean()), 2),
            "flagged": result.flagged,
            "classes": [
                {
                    "class": g.group,
                    "fp32": round(100 * g.reference, 1),
                    "quantized": round(100 * g.quantized, 1),
                    "drop": round(100 * g.degradation, 2),
                    "drop_ci": [round(100 * v, 2) for v in g.degradation_ci],
                    "p": round(g.p_value, 4),
                }
                for g in result.groups
            ],  # fmt: skip
            "energy": count_operations(q, images[:1]).to_dict(),
        }
        print(name, scheme, out[scheme]["accuracy"], result.flagged, flush=True)
    return out


def smollm2_audit() -> dict:
    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    windows, article = eval_windows(tok, 512, 2048)
    subjects = [a.split(" is ", 1)[0].split(" was ", 1)[0][:30] for a in eval_articles()]
    titles = [" ".join(t.split()) for t in subjects]  # one line each
    groups = [f"{int(i)}: {titles[i]}" for i in article]
    ref = window_nlls(model, windows)
    out = {"windows": len(windows), "articles": len(set(groups))}
    out["fp32"] = _ppl(ref)
    for scheme in ("w4g128", "w3g64"):
        q = copy.deepcopy(model)
        lowbit.quantize_(q, lowbit.parse_scheme(scheme), exclude=["lm_head", "model.embed_tokens"])
        nll = window_nlls(q, windows)
        del q
        result = audit(-ref / 511, -nll / 511, groups)  # higher better: minus NLL per token
        out[scheme] = _ppl(nll) | {
            "flagged": result.flagged,
            "articles": [
                {
                    "article": g.group,
                    "windows": g.n,
                    "nll_increase": round(g.degradation, 4),
                    "ci": [round(v, 4) for v in g.degradation_ci],
                    "p": round(g.p_value, 4),
                }
                for g in result.groups
            ],  # fmt: skip
            "mean_nll_increase": round(result.overall.degradation, 4),
        }
        print("smollm2", scheme, out[scheme]["perplexity"], result.flagged, flush=True)
    return out


def _ppl(nlls) -> dict:
    lo, hi = perplexity_interval(nlls, 512)
    ppl = nll_perplexity(nlls, 512)
    return {"perplexity": round(ppl, 2), "ci": [round(lo, 2), round(hi, 2)]}


def mobilenet() -> tuple[dict, dict]:
    """Energy per image (fp32, static W8A8 calibrated on the 512 calibration crops) and, for the W8A8 model,
    each layer's input range and clipped fraction on 64 evaluation crops (the five that clip most)."""
    from lowbit.eval.ranges import activation_ranges

    model, _ = lowbit.models.load("mobilenetv2", progress=False)
    model.eval()
    crops = vision.photo_crops("eval", 64)
    energy = {"fp32": count_operations(model, crops[:1]).to_dict()}
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.StaticW8A8(), calibration_batches("photos:512"))
    energy["w8a8 static"] = count_operations(q, crops[:1]).to_dict()
    ranges = activation_ranges(q, crops.split(16))
    top = sorted(ranges, key=lambda r: -r.clipped)[:5]
    clipped = {
        "crops": len(crops),
        "layers": len(ranges),
        "clipping_layers": sum(r.clipped > 0 for r in ranges),
        "mean_clipped": sum(r.clipped for r in ranges) / len(ranges),
        "top": [
            {
                "layer": r.name,
                "clipped": r.clipped,
                "range": [r.low, r.high],
                "representable": r.representable,
            }
            for r in top
        ],  # fmt: skip
    }
    return energy, clipped


def smollm2_energy() -> dict:
    model, tok = lowbit.models.load("smollm2-135m", progress=False)
    ids = calib_batches(tok, 1, 512)[0][:, :1]  # one decoded token: every weight read once
    fwd = lambda m, b: m(input_ids=b, use_cache=False)  # noqa: E731
    out = {"fp32": count_operations(model, ids, fwd).to_dict()}
    for scheme in ("w8", "w4g128", "w8a8"):
        q = copy.deepcopy(model)
        lowbit.quantize_(q, lowbit.parse_scheme(scheme))
        out[scheme] = count_operations(q, ids, fwd).to_dict()
        del q
    return out


def markdown(record: dict) -> str:
    lines = [
        "# Energy estimates and per-class audits",
        "",
        f"`{record['command']}` ({record['finished']}).",
        "",
    ]
    lines += _classes_md(record["audit"]) + _articles_md(record["smollm2_articles"])
    lines += _energy_md(record["energy"]) + _clipping_md(record["mobilenetv2_clipping"])
    return "\n".join(lines) + "\n"


def _classes_md(audits: dict) -> list[str]:
    lines = ["## Per-class audit (test accuracy %, static PTQ vs fp32)", ""]
    note = "Flagged: classes that lose significantly more than the others (permutation test, Holm-adjusted "
    note += "p < 0.05), with their drop in points and its 95% bootstrap interval."
    lines += [note, "", "| model | fp32 | W8A8 | flagged | W4A8 | flagged |", "|---|---:|---:|---|---:|---|"]
    for name, r in audits.items():
        cells = [name, r["fp32"]["accuracy"]]
        for scheme in ("w8a8", "w4a8"):
            flagged = [c for c in r[scheme]["classes"] if c["class"] in r[scheme]["flagged"]]
            text = "; ".join(
                f"class {c['class']}: -{c['drop']} [{c['drop_ci'][0]}, {c['drop_ci'][1]}], p {c['p']}"
                for c in flagged
            )
            cells += [r[scheme]["accuracy"], text or "none"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _articles_md(a: dict) -> list[str]:
    lines = [
        "",
        f"## SmolLM2-135M per held-out article ({a['articles']} articles, {a['windows']} windows of 512)",
    ]
    lines += [
        "",
        "| model | perplexity [95% CI] | mean NLL increase | flagged articles (NLL increase per token) |",
    ]
    lines += ["|---|---|---:|---|"]
    lines.append(f"| fp32 | {a['fp32']['perplexity']} [{a['fp32']['ci'][0]}, {a['fp32']['ci'][1]}] | | |")
    for scheme in ("w4g128", "w3g64"):
        r = a[scheme]
        flagged = [
            f"{x['article']} (+{x['nll_increase']}, p {x['p']})"
            for x in r["articles"]
            if x["article"] in r["flagged"]
        ]
        ppl = f"{r['perplexity']} [{r['ci'][0]}, {r['ci'][1]}]"
        lines.append(f"| RTN {scheme} | {ppl} | {r['mean_nll_increase']} | {'; '.join(flagged) or 'none'} |")
    return lines


def _energy_md(energy: dict) -> list[str]:
    lines = ["", "## Energy per inference, estimated (Horowitz ISSCC 2014, 45 nm)", ""]
    lines += ["| model | scheme | MACs | compute uJ | weights uJ | activations uJ | total uJ |"]
    lines += ["|---|---|---|---:|---:|---:|---:|"]
    rows = [(n, s, e) for n, r in energy.items() for s, e in r.items()]
    for name, scheme, e in rows:
        macs = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in e["macs_per_inference"].items())
        uj = [e[k] for k in ("compute_uj", "weights_uj", "activations_uj", "total_uj")]
        lines.append(f"| {name} | {scheme} | {macs} | " + " | ".join(f"{v:.2f}" for v in uj) + " |")
    return lines + ["", "Assumptions: " + rows[0][2]["assumptions"] + "."]


def _clipping_md(c: dict) -> list[str]:
    lines = [
        "",
        f"## MobileNetV2 static W8A8: inputs outside the calibrated range ({c['crops']} evaluation crops)",
        "",
    ]
    text = f"{c['clipping_layers']} of {c['layers']} layers clip some input; mean fraction clipped "
    text += f"{100 * c['mean_clipped']:.4f}%. A chain of static layers passes requantized codes, each "
    text += (
        "already inside the next layer's input range: clipping shows where float values enter (the image)."
    )
    lines += [text, ""]
    lines += ["| layer | clipped % | input range | representable |", "|---|---:|---|---|"]
    for t in (t for t in c["top"] if t["clipped"] > 0):
        rng = "[{:.2f}, {:.2f}]".format(*t["range"])
        rep = "[{:.2f}, {:.2f}]".format(*t["representable"])
        lines.append(f"| {t['layer']} | {100 * t['clipped']:.3f} | {rng} | {rep} |")
    return lines


def main() -> None:
    torch.set_num_threads(2)
    record = {"command": " ".join(["python benchmarks/energy_audit.py", *sys.argv[1:]])}
    record["audit"] = {
        n: cnn_audit(n, d) for n, d in (("fashion-mnist-cnn", "fashion-mnist"), ("mnist-cnn", "mnist"))
    }
    record["smollm2_articles"] = smollm2_audit()
    record["energy"] = {
        n: {s: r[s]["energy"] for s in ("fp32", "w8a8", "w4a8")} for n, r in record["audit"].items()
    }
    record["energy"]["mobilenetv2 (224x224 image)"], record["mobilenetv2_clipping"] = mobilenet()
    record["energy"]["smollm2-135m (per decoded token)"] = smollm2_energy()
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "energy_audit.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "energy_audit.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
