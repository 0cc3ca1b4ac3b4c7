"""Energy per inference, estimated: operations counted per kind on a real forward pass, times the
per-operation energies of a cited table; and, where the machine exposes them, RAPL energy counters.

What is counted (``count_operations``, forward hooks on one batch): for every ``nn.Linear``,
``nn.Conv2d`` and lowbit quantized layer, its multiply-accumulates (Linear: rows x in x out; Conv2d:
output elements x in/groups x kh x kw) by the arithmetic it runs, and the bytes it reads and writes:
its weights as stored (codes, scales, zero points, tables, bias; float layers: their parameters) and its
input and output activations (4 bytes per element in float32, 2 in 16-bit floats, 1 for the int8
activations of static W8A8 layers, whose codes an integer runtime passes between layers).

| arithmetic of the layer                                        | MAC kind |
|----------------------------------------------------------------|----------|
| float layer (float32 / bfloat16 / float16 weights)             | fp32 / fp16 |
| weight-only quantized (``QLinear``): weights decoded in-kernel | fp32     |
| dynamic or static W8A8 (``QDynamicLinear``, ``QStatic*``)      | int8     |

Energies (``HOROWITZ_45NM``: M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014, 45 nm at 0.9 V): a MAC is a multiply plus an add at the accumulator's width (int8: 8-bit
multiply 0.2 pJ + 32-bit add 0.1 pJ; fp32: 3.7 + 0.9 pJ; fp16: 1.1 + 0.4 pJ). Memory: weights are read
from DRAM once per inference (batch-1 serving: every decoded token of a language model reads them all),
at the midpoint of 1.3-2.6 nJ per 64-bit access, 244 pJ per byte; activations move through a 1 MB on-chip
SRAM, 100 pJ per 64-bit access, 12.5 pJ per byte, counted per sample. Not counted: attention's matmuls
and softmax, norms, element-wise ops, embedding lookups, control. The figures are an estimate on a 45 nm
reference, not a measurement of this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.eval.size import tensor_bytes
from lowbit.nn.dynamic import QDynamicLinear
from lowbit.nn.modules import QEmbedding, QuantizedWeightModule
from lowbit.nn.static import QStaticConv2d, StaticActivations

HOROWITZ_45NM = {  # picojoules per operation (MAC = multiply + accumulate add) or per DRAM byte
    "mac_int8": 0.2 + 0.1,
    "mac_fp16": 1.1 + 0.4,
    "mac_fp32": 3.7 + 0.9,
    "dram_byte": 1950.0 / 8,  # midpoint of 1.3-2.6 nJ per 64-bit access
    "sram_byte": 100.0 / 8,  # 1 MB SRAM, 100 pJ per 64-bit access
}
HOROWITZ_SOURCE = "Horowitz, ISSCC 2014, 45 nm, 0.9 V"
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


@dataclass
class LayerOps:
    """One layer's counts on the batch: ``macs`` of ``kind`` ("int8", "fp16", "fp32"), bytes read and
    written (``weight_bytes``, ``activation_bytes``)."""

    name: str
    kind: str
    macs: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0


@dataclass
class EnergyEstimate:
    """Totals per inference (the batch counted, divided by ``samples``), in microjoules, and the layers."""

    samples: int
    layers: list[LayerOps]
    table: dict[str, float] = field(default_factory=lambda: dict(HOROWITZ_45NM))

    def macs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.kind] = out.get(layer.kind, 0) + layer.macs
        return {k: v // self.samples for k, v in sorted(out.items())}

    def compute_uj(self) -> float:
        return sum(self.table[f"mac_{k}"] * n for k, n in self.macs().items()) / 1e6

    def weights_uj(self) -> float:
        return self.table["dram_byte"] * sum(layer.weight_bytes for layer in self.layers) / 1e6

    def activations_uj(self) -> float:
        moved = sum(layer.activation_bytes for layer in self.layers) / self.samples
        return self.table["sram_byte"] * moved / 1e6

    def total_uj(self) -> float:
        return self.compute_uj() + self.weights_uj() + self.activations_uj()

    def to_dict(self) -> dict:
        return {
            "source": HOROWITZ_SOURCE,
            "pj_per_op": self.table,
            "macs_per_inference": self.macs(),
            "compute_uj": round(self.compute_uj(), 3),
            "weights_uj": round(self.weights_uj(), 3),
            "activations_uj": round(self.activations_uj(), 3),
            "total_uj": round(self.total_uj(), 3),
            "assumptions": "weights read from DRAM once per inference, activations through a 1 MB SRAM; "
            "attention matmuls, norms, element-wise ops and embedding lookups not counted; 45 nm energies",
        }


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (QDynamicLinear, StaticActivations)):
        return "int8"
    if isinstance(module, QuantizedWeightModule) and not isinstance(module, QEmbedding):
        return "fp32"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return "fp16" if module.weight.dtype in (torch.float16, torch.bfloat16) else "fp32"
    return None


def _macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, (nn.Conv2d, QStaticConv2d)):
        kernel = module.weight_shape if isinstance(module, QStaticConv2d) else module.weight.shape
        return out.numel() * kernel[1] * kernel[2] * kernel[3]
    return out.numel() * x.shape[-1]


def count_operations(
    model: nn.Module, batch, forward: Callable | None = None, samples: int = 1
) -> EnergyEstimate:
    """Run ``forward(model, batch)`` (default ``model(batch)``) once under hooks and count each layer's
    MACs and bytes (module docstring). ``samples``: inferences in ``batch`` (images, or sequences: for a
    language model one inference is one sequence of the batch's length)."""
    layers: dict[str, LayerOps] = {}
    handles = []

    def hook(name: str, kind: str):
        def fn(mod, args, out):
            x = args[0]
            act = 1 if kind == "int8" and isinstance(mod, StaticActivations) else x.element_size()
            ops = layers.setdefault(name, LayerOps(name, kind, weight_bytes=tensor_bytes(mod.state_dict())))
            ops.macs += _macs(mod, x, out)
            ops.activation_bytes += (x.numel() + out.numel()) * act

        return fn

    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            handles.append(module.register_forward_hook(hook(name, kind)))
    try:
        with torch.no_grad():
            (forward or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not any(layer.macs for layer in layers.values()):
        raise LowbitError(
            "no Linear or Conv2d layer ran on the batch: nothing to count for the energy estimate"
        )
    return EnergyEstimate(samples, list(layers.values()))


def measured_energy_uj(run: Callable[[], object], repeats: int = 5) -> dict | None:
    """The package's energy per call of ``run`` from the RAPL counter (microjoules, whole CPU package,
    idle power included), the median of ``repeats``; None where the counter is absent or unreadable."""
    try:
        read = lambda: int(RAPL.read_text())  # noqa: E731
        read()
    except (OSError, ValueError):
        return None
    values, seconds = [], []
    for _ in range(repeats):
        e0, t0 = read(), time.perf_counter()
        run()
        e1, t1 = read(), time.perf_counter()
        if e1 >= e0:  # the counter wraps around; skip that call
            values.append(e1 - e0)
            seconds.append(t1 - t0)
    if not values:
        return None
    values.sort()
    return {"package_uj": values[len(values) // 2], "seconds": sorted(seconds)[len(seconds) // 2],
            "counter": str(RAPL)}  # fmt: skip
