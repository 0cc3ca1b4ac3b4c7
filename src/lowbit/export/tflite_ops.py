"""Lowering of a traced CNN (``torch.fx``, shapes recorded) to TFLite operators, node by node, for
``lowbit.export.tflite`` (whose docstring has the mapping table). ``Lowering.run`` fills a
``TFLiteWriter`` and returns the graph's input and output tensors.

Each node's value is one TFLite tensor: float32, or int8 with per-tensor qparams (NHWC for 4-d). A static
layer reads int8 codes under its input qparams: a float tensor is quantized (QUANTIZE), an int8 tensor
under other qparams requantized (QUANTIZE int8 -> int8), once per tensor and qparams. Float ops read
float tensors (DEQUANTIZE of int8 ones), as lowbit's own forward dequantizes between layers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.export.tflite_flatbuffer import QParams, TensorInfo, TFLiteWriter
from lowbit.kernels.integer import integer_params, weight_values
from lowbit.nn.static import CONV_KEYS, Add, QStaticAdd, QStaticConv2d, QStaticLinear

STATIC_LAYERS = (QStaticConv2d, QStaticLinear)
FUNCTIONS = {  # call_function targets -> handler
    torch.flatten: "flatten",
    nn.functional.adaptive_avg_pool2d: "global_pool",
    nn.functional.relu: "relu",
    torch.relu: "relu",
    nn.functional.relu6: "relu6",
    operator.add: "add",
    torch.add: "add",
}
METHODS = {"flatten": "flatten", "view": "flatten", "reshape": "flatten", "mean": "global_pool",
           "size": "size", "relu": "relu"}  # fmt: skip
MODULES = (  # (module types, handler), first match wins
    (QStaticConv2d, "conv"),
    (QStaticLinear, "linear"),
    (QStaticAdd, "static_add"),
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (Add, "add"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    ((nn.Identity, nn.Dropout), "passthrough"),
    (nn.AdaptiveAvgPool2d, "global_pool"),
    (nn.Flatten, "flatten"),
    ((nn.MaxPool2d, nn.AvgPool2d), "pool"),
)
PASSTHROUGH = ("passthrough", "flatten", "size")  # handlers MEAN looks through for the next layer's qparams


def act_qparams(m: nn.Module, side: str) -> QParams:
    """int8 qparams of ``m``'s ``side`` ("input"/"output") activation: uint8 code ``q`` (zero point ``z``)
    becomes int8 ``q - 128`` (zero point ``z - 128``), the same real values."""
    shift = m.act_spec.fmt.qmin + 128  # 128 for uint8, 0 for int8
    zero_point = int(getattr(m, f"{side}_zero_point")) - shift
    return QParams.per_tensor(float(getattr(m, f"{side}_scale")), zero_point)


def range_activation(qp: QParams) -> str:
    """The fused activation an int8 output range stands for: RELU6/RELU where it starts at 0 (ending at
    most at 6 / above), else NONE. Either clamps only what the int8 range clamps already."""
    if qp.zero_point[0] != -128:
        return "NONE"
    return "RELU6" if 255 * qp.scale[0] <= 6 * (1 + 1e-6) else "RELU"


def conv_padding(in_hw: tuple[int, int], conv: dict) -> tuple[str, list[list[int]] | None]:
    """TFLite padding that computes torch's zero padding for input size ``in_hw``: ("VALID"/"SAME", None)
    or ("VALID", [[top, bottom], [left, right]]) for an explicit PAD first. TFLite's SAME pads bottom/right
    more when the total is odd, torch both sides alike: a stride-2 3x3 conv on an even size differs."""
    pads, same = [], True
    params = zip(*(_pair(conv[k]) for k in ("kernel_size", "stride", "padding", "dilation")), strict=True)
    for size, (k, s, p, d) in zip(in_hw, params, strict=True):
        eff = d * (k - 1) + 1
        out = (size + 2 * p - eff) // s + 1
        after = max((out - 1) * s + eff - size - p, 0)  # trailing padding torch's last window reads
        total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
        same = same and math.ceil(size / s) == out and total // 2 == p and total - p == after
        pads.append([p, after])
    if all(p == 0 for p, _ in pads):
        return "VALID", None
    return ("SAME", None) if same else ("VALID", pads)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _nhwc(shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


@dataclass(eq=False)
class Value:
    """What an fx node computed: a TFLite tensor; for a flattened H x W > 1 map kept in NHWC order,
    ``perm`` (element j is torch's element ``perm[j]``) and the 4-d ``source`` it was flattened from."""

    t: TensorInfo | None
    perm: np.ndarray | None = None
    source: TensorInfo | None = None


class Lowering:
    """Writes the nodes of fx GraphModule ``gm`` into ``writer`` (see the module docstring)."""

    def __init__(self, writer: TFLiteWriter, gm) -> None:
        self.w, self.gm = writer, gm
        self.env: dict = {}  # fx node -> Value
        self.converted: dict[tuple, TensorInfo] = {}  # (tensor index, qparams or dtype) -> converted tensor
        self.producer: dict[int, object] = {}  # tensor index -> the operator that wrote it (fusion)

    def run(self) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
        inputs, outputs = {}, {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if inputs:
                    raise LowbitError("TFLite export takes models with one input tensor")
                shape = _nhwc(node.meta["tensor_meta"].shape)
                inputs["input"] = self.w.tensor("input", shape, "float32", dynamic_batch=True)
                self.env[node] = Value(inputs["input"])
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, torch.fx.Node):
                    raise LowbitError("TFLite export takes models that return one tensor")
                outputs["output"] = self.float(self.env[result])
            else:
                self.env[node] = self.lower(node)
        return inputs, outputs

    # -- dispatch ----------------------------------------------------------------------------------

    def handler(self, node) -> tuple[str, nn.Module | None]:
        """(handler name, module or None) of ``node``; ``LowbitError`` for anything without a mapping."""
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            for types, name in MODULES:
                if isinstance(m, types):
                    return name, m
            what = f"{node.target} ({type(m).__name__})"
        elif node.op == "call_function" and node.target in FUNCTIONS:
            return FUNCTIONS[node.target], None
        elif node.op == "call_method" and node.target in METHODS:
            return METHODS[node.target], None
        else:
            what = f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        raise LowbitError(
            f"TFLite export: {what} has no TFLite mapping; supported: static/float Conv2d (groups 1 or "
            "depthwise) and Linear, residual Add, ReLU/ReLU6, global average pooling, flatten, "
            "max/average pooling without padding, Dropout/Identity"
        )

    def lower(self, node) -> Value:
        name, m = self.handler(node)
        args = [self.env[a] for a in node.args if isinstance(a, torch.fx.Node)]
        return getattr(self, f"_{name}")(node, m, *args)

    # -- tensors -----------------------------------------------------------------------------------

    def out(self, node, dtype: str, qp: QParams | None = None) -> TensorInfo:
        """A new tensor for ``node``'s output (NHWC shape of its recorded torch shape)."""
        name = node.target if node.op == "call_module" else node.name
        return self.w.tensor(name, _nhwc(node.meta["tensor_meta"].shape), dtype, qp)

    def plain(self, v: Value) -> TensorInfo:
        """``v`` as a tensor in torch's element order (a TRANSPOSE + RESHAPE for an NHWC-order flatten)."""
        if v.perm is None:
            return v.t
        key = (v.t.index, "plain")
        if key not in self.converted:
            n, h, w, c = v.source.shape
            nchw = self.w.tensor(f"{v.source.name}_nchw", (n, c, h, w), v.t.dtype, v.t.qparams)
            perm = self.w.const(f"{v.source.name}_perm", np.array([0, 3, 1, 2], np.int32))
            self.w.op("TRANSPOSE", [v.source, perm], [nchw])
            self.converted[key] = self.reshape(nchw, v.t.shape)
        return self.converted[key]

    def reshape(self, t: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
        y = self.w.tensor(f"{t.name}_reshaped", shape, t.dtype, t.qparams)
        new_shape = self.w.const(f"{t.name}_shape", np.array([-1, *shape[1:]], np.int32))  # batch dynamic
        self.w.op("RESHAPE", [t, new_shape], [y])
        return y

    def int8(self, v: Value, qp: QParams, name: str) -> TensorInfo:
        """``v`` as int8 codes under ``qp``: itself, or QUANTIZE (from float, or requantizing int8)."""
        t = self.plain(v)
        if t.dtype == "int8" and t.qparams == qp:
            return t
        key = (t.index, qp)
        if key not in self.converted:
            self.converted[key] = self.w.tensor(f"{name}.input_quantized", t.shape, "int8", qp)
            self.w.op("QUANTIZE", [t], [self.converted[key]])
        return self.converted[key]

    def float(self, v: Value) -> TensorInfo:
        """``v`` as float32: itself, or DEQUANTIZE of its int8 codes."""
        t = self.plain(v)
        if t.dtype == "float32":
            return t
        key = (t.index, "float32")
        if key not in self.converted:
            self.converted[key] = self.w.tensor(f"{t.name}_dequantized", t.shape, "float32")
            self.w.op("DEQUANTIZE", [t], [self.converted[key]])
        return self.converted[key]

    def written(self, op, y: TensorInfo) -> Value:
        self.producer[y.index] = op
        return Value(y)

    # -- layers ------------------------------------------------------------------------------------

    def _conv(self, node, m, x: Value) -> Value:
        c = m.conv if isinstance(m, QStaticConv2d) else {k: getattr(m, k) for k in CONV_KEYS}
        if isinstance(c["padding"], str) or getattr(m, "padding_mode", "zeros") != "zeros":
            raise LowbitError(
                f"TFLite export: {node.target} has padding {c['padding']!r}; explicit zeros only"
            )
        depthwise = c["groups"] > 1 and c["groups"] == c["in_channels"]
        if c["groups"] > 1 and not depthwise:
            raise LowbitError(
                f"TFLite export: {node.target} is a grouped conv (groups={c['groups']}); TFLite export "
                "writes groups=1 and depthwise (groups = in_channels) convs"
            )
        w = _weight(m).reshape(c["out_channels"], c["in_channels"] // c["groups"], *_pair(c["kernel_size"]))
        w = np.transpose(w, (1, 2, 3, 0) if depthwise else (0, 2, 3, 1))  # [1, kh, kw, C*mult] or OHWI
        padding, pads = conv_padding(x.t.shape[1:3], c)
        (sh, sw), (dh, dw) = _pair(c["stride"]), _pair(c["dilation"])
        opts = {
            "padding": padding,
            "strideH": sh,
            "strideW": sw,
            "dilationHFactor": dh,
            "dilationWFactor": dw,
        }
        if depthwise:
            opts["depthMultiplier"] = c["out_channels"] // c["in_channels"]
        kind = "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D"
        return self.layer(node, m, x, kind, w, 3 if depthwise else 0, opts, pads)

    def _linear(self, node, m, x: Value) -> Value:
        w = _weight(m)
        if x.perm is not None:  # x is an NHWC-order flatten: reorder the columns to match
            w = w[:, x.perm]
        elif len(x.t.shape) != 2:
            raise LowbitError(f"TFLite export: {node.target} reads a {len(x.t.shape)}-d tensor; 2-d only")
        return self.layer(node, m, Value(x.t), "FULLY_CONNECTED", w, 0, {})

    def layer(self, node, m, x: Value, kind: str, w: np.ndarray, axis: int, opts: dict, pads=None) -> Value:
        """Conv/FC ``kind`` of ``m`` with weights ``w`` in TFLite's layout (output channels on ``axis``):
        int8 with an int32 bias when ``m`` is a static layer that requantizes its output, else float (a
        static layer's int8 input and weights dequantized, as lowbit's float-output layers compute)."""
        fqn = node.target
        if isinstance(m, STATIC_LAYERS):
            xt = self.int8(x, act_qparams(m, "input"), fqn)
            scales = tuple(float(s) for s in m.scale.float().reshape(-1))
            wt = self.w.const(f"{fqn}.weight", w.astype(np.int8), QParams(scales, (0,) * len(scales), axis))
            if m.requantize_output:
                qp = act_qparams(m, "output")
                bt, y = self.w.const(f"{fqn}.bias", *_int32_bias(m)), self.out(node, "int8", qp)
                opts = opts | {"fusedActivationFunction": range_activation(qp)}
                return self.written(self.w.op(kind, [self._pad(xt, pads, fqn), wt, bt], [y], **opts), y)
            xt = self.float(Value(xt))
            wf = self.w.tensor(f"{fqn}.weight_dequantized", wt.shape, "float32")
            self.w.op("DEQUANTIZE", [wt], [wf])
            wt = wf
        else:
            xt = self.float(x)
            wt = self.w.const(f"{fqn}.weight", w.astype(np.float32))
        bias = m.bias.detach().float().numpy() if m.bias is not None else np.zeros(w.shape[axis])
        bt, y = self.w.const(f"{fqn}.bias", bias.astype(np.float32)), self.out(node, "float32")
        return self.written(self.w.op(kind, [self._pad(xt, pads, fqn), wt, bt], [y], **opts), y)

    def _pad(self, t: TensorInfo, pads: list[list[int]] | None, name: str) -> TensorInfo:
        """PAD of NHWC ``t`` by ``pads`` (int8: with its zero point, i.e. real 0); ``t`` for None."""
        if pads is None:
            return t
        n, h, w, c = t.shape
        shape = (n, h + sum(pads[0]), w + sum(pads[1]), c)
        y = self.w.tensor(f"{name}.input_padded", shape, t.dtype, t.qparams)
        paddings = self.w.const(f"{name}.paddings", np.array([[0, 0], *pads, [0, 0]], np.int32))
        self.w.op("PAD", [t, paddings], [y])
        return y

    # -- elementwise and shape ops -------------------------------------------------------------------

    def _static_add(self, node, m, a: Value, b: Value) -> Value:
        qp = act_qparams(m, "output")
        ta, tb = self.plain(a), self.plain(b)  # int8 codes under their own qparams, which ADD rescales
        ta, tb = (t if t.dtype == "int8" else self.int8(Value(t), qp, node.target) for t in (ta, tb))
        y = self.out(node, "int8", qp)
        return self.written(self.w.op("ADD", [ta, tb], [y], fusedActivationFunction=range_activation(qp)), y)

    def _add(self, node, m, *args: Value) -> Value:
        if len(args) != 2 or len(node.args) != 2 or node.kwargs:
            raise LowbitError(f"TFLite export: {node.name} adds other than two tensors; not mapped")
        ta, tb = (self.float(v) for v in args)
        y = self.out(node, "float32")
        return self.written(self.w.op("ADD", [ta, tb], [y]), y)

    def _relu(self, node, m, x: Value, kind: str = "RELU") -> Value:
        t = self.plain(x)
        op = self.producer.get(t.index)
        if op is not None and self.sole_reader(node) and self.w.fuse_activation(op, kind):
            return Value(t)
        y = self.w.tensor(node.name, t.shape, t.dtype, t.qparams)
        return self.written(self.w.op(kind, [t], [y]), y)

    def sole_reader(self, node) -> bool:
        """Whether ``node`` is the only reader of its input's tensor (through passthrough nodes)."""
        src = node.args[0]
        while True:
            if len(src.users) != 1:
                return False
            if (
                src.op not in ("call_module", "call_function", "call_method")
                or self.handler(src)[0] != "passthrough"
            ):
                return True
            src = src.args[0]

    def _relu6(self, node, m, x: Value) -> Value:
        return self._relu(node, m, x, "RELU6")

    def _passthrough(self, node, m, x: Value) -> Value:
        return x

    def _size(self, node, m, x: Value) -> Value:
        return Value(None)  # an int for a view(x.size(0), -1); the reshape reads its output shape

    def _flatten(self, node, m, x: Value, *rest) -> Value:
        shape = tuple(node.meta["tensor_meta"].shape)
        t = x.source if x.perm is not None else x.t
        if len(shape) != 2 or shape[1] != math.prod(t.shape[1:]):
            raise LowbitError(f"TFLite export: {node.name} reshapes to {list(shape)}; only (N, -1) is mapped")
        if len(t.shape) != 4 or t.shape[1] * t.shape[2] == 1 or t.shape[3] == 1:
            return Value(self.reshape(t, shape))  # NHWC and NCHW orders agree
        n, h, w, c = t.shape
        perm = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        return Value(self.reshape(t, shape), perm, t)

    def _global_pool(self, node, m, x: Value) -> Value:
        t = self.plain(x)
        size = m.output_size if m is not None else (node.args[1] if len(node.args) > 1 else None)
        keep = True
        if node.op == "call_method":  # x.mean(dims, keepdim)
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
            dims = [dims] if isinstance(dims, int) else list(dims)
            keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
            size = 1 if len(t.shape) == 4 and sorted(d % 4 for d in dims) == [2, 3] else None
        if size is None or len(t.shape) != 4 or _pair(size) != (1, 1):
            raise LowbitError(
                f"TFLite export: {node.name} averages other than a map down to 1 x 1; not mapped"
            )
        axes = self.w.const(f"{node.name}.axes", np.array([1, 2], np.int32))
        if t.dtype == "int8":
            y = self.out(node, "int8", self.next_qparams(node) or t.qparams)
        else:
            y = self.out(node, "float32")
        self.w.op("MEAN", [t, axes], [y], keepDims=keep)
        return Value(y)

    def next_qparams(self, node) -> QParams | None:
        """Input qparams of the static layers ``node``'s value reaches through passthrough ops, when they
        are one set; else None."""
        found, todo = set(), list(node.users)
        while todo:
            user = todo.pop()
            if user.op == "output":
                return None
            name, m = self.handler(user)
            if isinstance(m, STATIC_LAYERS):
                found.add(act_qparams(m, "input"))
            elif name in PASSTHROUGH:
                todo.extend(user.users)
            else:
                return None
        return found.pop() if len(found) == 1 else None

    def _pool(self, node, m, x: Value) -> Value:
        k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
        if any(_pair(m.padding)) or m.ceil_mode or _pair(getattr(m, "dilation", 1)) != (1, 1):
            raise LowbitError(f"TFLite export: {node.target} pools with padding, dilation or ceil_mode")
        t = self.plain(x)
        y = self.out(node, t.dtype, t.qparams)
        kind = "MAX_POOL_2D" if isinstance(m, nn.MaxPool2d) else "AVERAGE_POOL_2D"
        opts = {
            "padding": "VALID",
            "strideH": s[0],
            "strideW": s[1],
            "filterHeight": k[0],
            "filterWidth": k[1],
        }
        return self.written(self.w.op(kind, [t], [y], **opts), y)


def _int32_bias(m: nn.Module) -> tuple[np.ndarray, QParams]:
    """A requantizing static layer's int32 bias, ``round(b / (x_scale * w_scale))`` as lowbit's integer
    forward adds it (zeros without a bias), and its qparams: scale ``x_scale * w_scale``, zero point 0."""
    bias_q, _, _ = integer_params(m)
    bias = np.zeros(m.rows, np.int32) if bias_q is None else bias_q.numpy().astype(np.int32)
    scales = (m.input_scale.double() * m.scale.double().reshape(-1)).float()
    return bias, QParams(tuple(float(s) for s in scales), (0,) * m.rows)


def _weight(m: nn.Module) -> np.ndarray:
    """Weight of a static layer as its integer codes ``(rows, cols)`` (exactly lowbit's), of a float layer
    as float32 in torch's layout."""
    if isinstance(m, STATIC_LAYERS):
        return weight_values(m).numpy().astype(np.int8).reshape(m.rows, m.cols)
    return m.weight.detach().float().numpy()
