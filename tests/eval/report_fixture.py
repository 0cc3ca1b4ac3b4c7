"""Hand-built lowbit report dicts (the schema ``lowbit report`` writes) for the HTML and model card tests.

``sample_report()``: every part measured, with more layers than the histogram grid shows (60 > 48), more
audit groups than the plot shows (50 > 40), missing values (an embedding without SQNR) and names holding
HTML (``<``, ``&``). ``sparse_report()``: only the required keys and size; every other part None.
"""

from __future__ import annotations

import math
import random

TITLE = "smollm2-135m <w4g128> & awq+gptq"
BASELINE = "smollm2<script>alert(1)</script>"
N_BLOCKS = 12
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def _layers() -> list[dict]:
    out = [
        {"name": "model.embed_tokens", "kind": "Embedding", "format": "float", "backend": None,
         "params": 28311552, "bytes": 113246208, "weight_sqnr_db": None, "weight_rel_error": None,
         "output_sqnr_db": None, "sensitivity": None},
    ]  # fmt: skip
    for b in range(N_BLOCKS):
        for k, proj in enumerate(PROJ):
            params = 576 * (1536 if proj == "down_proj" else 576)
            out.append({
                "name": f"model.layers.{b}.{'mlp' if proj == 'down_proj' else 'self_attn'}.{proj}",
                "kind": "Linear", "format": "int4 g128 asym", "backend": "native" if k % 2 else None,
                "params": params, "bytes": params // 2 + params // 128 * 4,
                "weight_sqnr_db": 21.0 + math.sin(b + k), "weight_rel_error": 0.09 - 0.002 * k,
                "output_sqnr_db": 18.5 + math.cos(b * 0.7 + k) - 0.1 * b,
                "sensitivity": 0.01 * (b + 1) if k == 4 else None,
            })  # fmt: skip
    return out


def _ranges(layers: list[dict]) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i, layer in enumerate(layers[1:]):
        low, high = -1.0 - i * 0.1, 1.5 + i * 0.2
        hist = [int(1000 * math.exp(-(((j - 12) / 4) ** 2))) + rng.randrange(3) for j in range(32)]
        static = i % 3 == 0
        out.append({
            "name": layer["name"], "values": 100000 + i, "low": low, "high": high,
            "p001": low * 0.6, "p999": high * 0.6, "hist": hist,
            "representable": [low * 0.8, high * 0.7] if static else None,
            "clipped": 0.0001 * (i % 7) if static else None,
        })  # fmt: skip
    return out


def _group(name: str, n: int, degradation: float, flagged: bool) -> dict:
    return {
        "group": name, "n": n, "reference": -2.85, "reference_ci": [-2.9, -2.8],
        "quantized": -2.85 - degradation, "quantized_ci": [-2.95 - degradation, -2.75 - degradation],
        "degradation": degradation, "degradation_ci": [degradation - 0.02, degradation + 0.02],
        "excess": degradation - 0.05, "p_value": 0.001 if flagged else 1.0, "flagged": flagged,
    }  # fmt: skip


def _audit() -> dict:
    groups = [_group(f"Article {i:02d}", 20 + i, 0.05 + 0.3 / (i + 1), i in (0, 1)) for i in range(50)]
    groups[3]["group"] = "Fish & <chips>"
    return {
        "grouping": "Wikipedia article",
        "score": "negative NLL per token (higher is better)",
        "alpha": 0.05,
        "permutations": 2000,
        "overall": _group("all", 81, 0.05, False),
        "groups": groups,
        "flagged": [groups[0]["group"], groups[1]["group"]],
    }


def _energy_side(source: str, kind: str, macs: int, compute: float, weights: float) -> dict:
    return {
        "source": source, "pj_per_op": {f"mac_{kind}": 4.6, "dram_byte": 243.75},
        "macs_per_inference": {kind: macs}, "compute_uj": compute, "weights_uj": weights,
        "activations_uj": 0.5, "total_uj": compute + weights + 0.5,
        "assumptions": "weights read from DRAM once per token; activations through a 1 MB SRAM",
    }  # fmt: skip


def _quality() -> dict:
    return {
        "task": "wiki-ppl",
        "metric": "perplexity",
        "higher_is_better": False,
        "unit": "per token",
        "samples": 81,
        "sample_unit": "windows of 512 tokens",
        "rows": [
            {"model": "baseline", "value": 17.33, "low": 15.95, "high": 18.84},
            {"model": "quantized", "value": 18.5, "low": 17.0, "high": 20.1},
        ],
        "delta": {"value": 1.17, "low": 0.9, "high": 1.4},
        "extra": [{"name": "top-1 agreement with baseline", "value": 0.91, "low": 0.9, "high": 0.92}],
    }


def _speed() -> dict:
    layer = {"name": "model.layers.0.mlp.down_proj", "shape": "576x1536", "backend": "native"}
    return {
        "threads": 2,
        "rows": [
            {"name": "decode", "unit": "tok/s", "baseline": 13.6, "quantized": 37.5},
            {"name": "prefill (128 tokens)", "unit": "tok/s", "baseline": 366, "quantized": 275},
        ],
        "layers": [{**layer, "baseline_us": 50.0, "quantized_us": 20.0}],
    }


def sample_report() -> dict:
    """A report with every part measured (energy without a RAPL measurement)."""
    layers = _layers()
    components = {"codes": 60000000, "scales": 3000000, "zero_points": 1000000, "tables": 0}
    components |= {"activation_qparams": 0, "float": 11000000}
    source = "Horowitz, ISSCC 2014"
    return {
        "format": "lowbit-report",
        "version": 1,
        "title": TITLE,
        "created": "2026-12-05T06:00:00Z",
        "lowbit_version": "0.1.0",
        "command": "lowbit report out/w4 --data wiki:8x512 --out rep",
        "model": {
            "reference": "out/w4",
            "baseline": BASELINE,
            "kind": "causal-lm",
            "scheme": "w4g128",
            "method": "awq+gptq",
            "layers_quantized": 60,
            "parameters": 134515008,
        },
        "size": {
            "baseline_bytes": 538060800,
            "quantized_bytes": 75000000,
            "compression": 7.17,
            "bits_per_weight": 4.5,
            "components": components,
            "baseline_components": {"float": 538060800},
        },
        "quality": _quality(),
        "speed": _speed(),
        "layers": layers,
        "ranges": _ranges(layers),
        "energy": {
            "per": "decoded token",
            "unit": "uJ",
            "baseline": _energy_side(source, "fp32", 134000000, 616.4, 131150.0),
            "quantized": _energy_side(source, "fp32", 134000000, 616.4, 18281.0),
            "measured": None,
        },
        "audit": _audit(),
        "not_measured": ["energy measured: this machine exposes no RAPL counters"],
        "timings_s": {"quality": 20.1, "layers": 10.0},
    }


def sparse_report() -> dict:
    """Only the required keys and the size; the other parts None, all but ``layers`` and ``ranges`` with
    a reason."""
    report = {key: None for key in sample_report()}
    report.update(
        format="lowbit-report",
        version=1,
        title=TITLE,
        model={"reference": "out/w4", "baseline": BASELINE},
        size={
            "baseline_bytes": None,
            "quantized_bytes": 75000000,
            "compression": None,
            "bits_per_weight": 4.5,
            "components": {"codes": 60000000, "scales": 3000000},
            "baseline_components": None,
        },
        not_measured=[
            "quality: skipped (--no-quality)",
            "speed: skipped (--no-speed)",
            "energy: no calibration data",
            "audit: no --groups given",
        ],
    )
    return report
