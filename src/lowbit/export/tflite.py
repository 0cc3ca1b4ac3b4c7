"""TFLite export: a static-int8 (``StaticW8A8``) or float CNN as a ``.tflite`` file that LiteRT's
interpreter (``ai_edge_litert``) runs. Written directly, no TensorFlow or converter: ``tflite_ops`` maps
the ops, ``tflite_flatbuffer`` writes the file with the schema that ships in ai-edge-litert.

The model is traced with ``torch.fx`` (lowbit's quantized modules as leaves) and run once on a batch-1
example for its shapes; each node becomes TFLite operators in NHWC layout. **The file takes float32
input in NHWC layout** ``(N, H, W, C)``, TFLite's own convention (camera and decoded-image buffers are
HWC): feed ``x.permute(0, 2, 3, 1)`` of what the PyTorch model takes. The batch dimension is dynamic
(``resize_tensor_input``); 2-d outputs (logits) are as PyTorch's, 4-d outputs NHWC.

| lowbit / torch                       | TFLite                                                          |
|--------------------------------------|-----------------------------------------------------------------|
| graph input                          | float32 NHWC; QUANTIZE to the first layer's input qparams       |
| ``QStaticConv2d``, groups 1          | CONV_2D, int8 weights OHWI, one scale per output channel (axis 0) |
| ``QStaticConv2d``, depthwise         | DEPTHWISE_CONV_2D, int8 weights ``[1, kh, kw, C*mult]`` (axis 3)  |
| ``QStaticLinear``                    | FULLY_CONNECTED, int8 weights, one scale per output channel     |
| their bias                           | int32 ``round(b / (x_scale * w_scale))``, lowbit's codes; scale |
|                                      | ``x_scale * w_scale``, zero point 0                             |
| ``requantize_output`` False          | DEQUANTIZE of the int8 input and weights, float op, float bias  |
|                                      | (what lowbit's float-output layers compute)                     |
| ``QStaticAdd``                       | ADD, int8, with its output qparams                              |
| torch padding SAME/VALID cannot say  | PAD (int8: with the zero point, real 0), then VALID             |
| global average pool to 1 x 1         | MEAN over H, W; int8 output takes the input qparams of the      |
|                                      | static layer it feeds (one rounding, as lowbit's)               |
| ``flatten``, ``view(n, -1)``         | RESHAPE; after an H x W > 1 map, the next FULLY_CONNECTED's     |
|                                      | weight columns are put in NHWC order (else a TRANSPOSE first)   |
| ReLU / ReLU6 modules or functions    | fused into the conv/FC/ADD before them where they are its only  |
|                                      | reader, else RELU / RELU6                                       |
| MaxPool2d, AvgPool2d (no padding)    | MAX_POOL_2D, AVERAGE_POOL_2D                                    |
| Dropout, Identity                    | nothing                                                         |
| int8 graph output                    | DEQUANTIZE to float32                                           |

Activations: lowbit's uint8 codes ``q`` with zero point ``z`` are written as int8 ``q - 128`` with zero
point ``z - 128`` (the same real values; LiteRT's integer kernels are int8). A ReLU/ReLU6 that static
quantization absorbed into a layer (listed in the checkpoint's ``identity``; the layer's output range
starts at 0) is written as that op's ``fused_activation_function`` (RELU6 where the range ends at or
below 6), which clamps nothing the int8 output range does not clamp already.

Numerics: weights and int32 biases are lowbit's codes bit for bit. TFLite requantizes with its own
fixed-point multiplier (``MultiplyByQuantizedMultiplier``, which rounds twice in the builtin kernels),
XNNPACK (LiteRT's default CPU path) in float32, and QUANTIZE rounds half away from zero; lowbit rounds
once, half up (``lowbit.core.fixed_point``), and quantizes half to even. Outputs agree up to one-code
ties per layer, not bit for bit: on mnist-cnn XNNPACK gave lowbit's codes in every layer, the builtin
kernels differ by 1-3 codes on 0.03-5% of a layer's outputs (tests/export/test_tflite.py); through
MobileNetV2's 52 int8 convs such differences spread, and 3-6% of the eval crops' top-1 differ from
lowbit's own int8 forward, as ONNX Runtime's do (benchmarks/results/tflite_litert.md).

A float model (no quantized layers) is written as fp32 the same way, each BatchNorm folded into the conv
before it on a copy first: the baseline the int8 file is timed against in the same interpreter.

Refused with a ``LowbitError`` naming the layer, before anything is written: weight-only and dynamic
layers, static layers with other than int8 weights or 8-bit activations, grouped (not depthwise) convs,
and modules or functions with no mapping above.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_write_bytes
from lowbit.export.tflite_flatbuffer import TFLiteWriter, load_schema
from lowbit.export.tflite_ops import STATIC_LAYERS, Lowering
from lowbit.nn.modules import QuantizedModule, QuantizedWeightModule
from lowbit.nn.static import Add, QStaticAdd


def export_tflite(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    input_shape: tuple[int, int, int] | None = None,
) -> dict:
    """Write ``model`` (StaticW8A8 CNN, or float CNN as fp32) as a TFLite flatbuffer to ``out`` atomically.

    ``input_shape``: ``(C, H, W)`` of one input image; by default the shape recorded at calibration
    (``lowbit_inputs``) or the bundled model's. Returns ``out``, ``bytes``, ``precision`` ("int8" or
    "float32"), ``ops`` and ``op_counts``, and the ``input`` (name, NHWC shape, layout)."""
    load_schema()  # a missing package is the first thing to say
    if Path(out).exists() and not overwrite:
        raise LowbitError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    static = check_exportable(model)
    chw = _input_shape(model, input_shape)
    work = model if static else _folded_copy(model)
    gm = _trace(work, chw)
    writer = TFLiteWriter()
    inputs, outputs = Lowering(writer, gm).run()
    precision = "int8" if static else "float32"
    source = getattr(model, "lowbit_source", None) or type(model).__name__
    data = writer.finish(inputs, outputs, f"lowbit export of {source} ({precision})")
    atomic_write_bytes(out, data, overwrite)
    counts = Counter(writer.kinds)
    return {
        "out": str(out),
        "bytes": Path(out).stat().st_size,
        "precision": precision,
        "ops": sum(counts.values()),
        "op_counts": dict(sorted(counts.items())),
        "input": {
            "name": "input",
            "shape": list(inputs["input"].shape),
            "layout": "NHWC",
            "dtype": "float32",
        },
    }


def check_exportable(model: nn.Module) -> bool:
    """True for a static int8 model, False for a float one; ``LowbitError`` naming the first quantized
    layer TFLite's integer kernels cannot run, and what to do instead."""
    static = False
    for fqn, m in model.named_modules():
        if isinstance(m, STATIC_LAYERS):
            fmt = m.spec.fmt
            if fmt.name != "int8":
                raise LowbitError(
                    f"TFLite export: {fqn} has {fmt.name} weights; TFLite's integer kernels take int8 "
                    "weights: quantize with --scheme w8a8-static (StaticW8A8(weight_bits=8))"
                )
        if isinstance(m, (*STATIC_LAYERS, QStaticAdd)):
            act = m.act_spec.fmt
            if act.bits != 8:
                raise LowbitError(
                    f"TFLite export: {fqn} has {act.name} activations; TFLite takes 8-bit activations "
                    "(StaticW8A8 with uint8 or int8 activation_format)"
                )
            static = True
        elif isinstance(m, QuantizedModule):
            what = f" ({m.format_label()})" if isinstance(m, QuantizedWeightModule) else ""
            raise LowbitError(
                f"TFLite export: {fqn} is {type(m).__name__}{what}; TFLite export takes static int8 models "
                "(lowbit quantize --scheme w8a8-static --calib ...) or float models (written as fp32); "
                "weight-only and dynamic layers have no TFLite integer form here"
            )
    return static


def _input_shape(model: nn.Module, given) -> tuple[int, int, int]:
    """(C, H, W) of one input: ``given``, the calibration batch's (``lowbit_inputs``) or the bundled
    model's."""
    from lowbit.models.vision import VISION_MODELS

    spec = getattr(model, "lowbit_inputs", None) or {}
    bundled = VISION_MODELS.get(getattr(model, "lowbit_source", None) or "")
    if given is not None:
        shape = tuple(given)
    elif list(spec) == ["input"] and spec["input"]["dtype"].startswith("float"):
        shape = tuple(spec["input"]["shape"][1:])
    elif spec:
        inputs = ", ".join(f"{k} ({v['dtype']})" for k, v in spec.items())
        raise LowbitError(f"TFLite export covers CNNs with one float image input; this model takes {inputs}")
    elif bundled is not None:
        shape = tuple(bundled.input_shape)
    else:
        raise LowbitError(
            "TFLite export needs the input shape: quantize with image calibration data, or pass "
            "input_shape=(C, H, W)"
        )
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise LowbitError(f"TFLite export takes one image input (C, H, W); got shape {shape}")
    return shape


def _folded_copy(model: nn.Module) -> nn.Module:
    """A copy of float ``model`` in eval mode with each BatchNorm2d folded into the conv before it."""
    from lowbit.transforms.fold import fold_batchnorm_

    work = copy.deepcopy(model).eval()
    fold_batchnorm_(work)
    return work


def _trace(model: nn.Module, chw: tuple[int, int, int]):
    """``model`` as an fx GraphModule (quantized modules and ``Add`` as leaves), shapes recorded for a
    batch-1 zero input (``node.meta["tensor_meta"]``)."""
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, (QuantizedModule, Add)) or super().is_leaf_module(m, name)

    try:
        gm = fx.GraphModule(model, Tracer().trace(model))
    except Exception as e:  # fx raises many types for code it cannot trace; say which model and why
        raise LowbitError(
            f"TFLite export reads the model's graph with torch.fx, which cannot trace "
            f"{type(model).__name__}: {type(e).__name__}: {e}"
        ) from e
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *chw))
    return gm
