"""ONNX export: a QDQ model that ONNX Runtime runs (and ``onnx.reference`` evaluates).

The model's float twin (static layers replaced by float layers holding their dequantized weights) is
exported with torch's TorchScript exporter, keeping parameter names. Then, for every ``QStaticConv2d``
/ ``QStaticLinear`` ``fqn`` (weight initializer ``fqn.weight``), the graph is rewritten the way ONNX
Runtime's own quantizer writes QDQ models:

| where             | inserted                                                                       |
|-------------------|--------------------------------------------------------------------------------|
| weight            | int8 initializer + DequantizeLinear (per output channel)                       |
| bias              | int32 initializer ``round(b / (x_scale * w_scale))`` + DequantizeLinear        |
| input activation  | QuantizeLinear -> DequantizeLinear with the calibrated input qparams (one pair  |
|                   | per tensor and qparams: layers reading the same tensor alike share it)         |
| output activation | QuantizeLinear -> DequantizeLinear with the calibrated output qparams           |
|                   | (``requantize_output`` False: none; the bias stays float except in a Gemm)     |
| ``QStaticAdd``    | QuantizeLinear -> DequantizeLinear after its Add node (found by scope name)     |
| few-channel conv  | a Pad of zero-point codes between the input's Q and DQ, and zero weight columns |
| < 8-bit codes     | a Clip to the format's code range between Q and DQ (weights: int8 initializers  |
|                   | holding the narrower codes; binary weights as -1/+1)                            |

Exported layer patterns: ``Conv``, ``Gemm`` (2-d Linear) and ``Transpose(W) -> MatMul -> Add(b)``
(Linear on 3-d input). A Gemm whose output stays float still gets the int32 bias, so that ONNX Runtime
runs it as QGemm (float output): its bias is then rounded to a multiple of ``x_scale * w_scale``, at
most half that step from lowbit's float bias, which ``MatMulIntegerToFloat`` (the 3-d form) adds as
is. ONNX Runtime fuses ``DQ -> Conv -> Q`` into QLinearConv, ``DQ, DQ -> Add -> Q`` into QLinearAdd,
and so on.

Channel padding: ONNX Runtime's fast symmetric int8 conv (MLAS ConvSym) takes only input channels in
multiples of ``CHANNEL_MULTIPLE``; other convs fall back to im2col + GEMM. A conv (groups 1) with
``MIN_PADDED_CHANNELS`` or more input channels that are not a multiple gets its input codes padded with
channels of the zero point (they dequantize to exactly 0) and its weight with zero channels, so its
outputs are unchanged. Padding a 3-channel stem (MobileNetV2's) to 4 lets ONNX Runtime run it on the
faster ConvSym; a 1-channel conv does not gain (padding quadruples its work), hence the minimum.
"""

from __future__ import annotations

import copy
import heapq
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.core.fsio import atomic_write_bytes
from lowbit.kernels.integer import integer_params, weight_values
from lowbit.nn.modules import QuantizedWeightModule
from lowbit.nn.static import Add, QStaticAdd, QStaticConv2d, QStaticLinear

OPSET = 19  # per-axis DequantizeLinear in onnx.reference needs opset 19
CHANNEL_MULTIPLE = 4  # input channels ONNX Runtime's symmetric int8 conv kernel wants (see above)
MIN_PADDED_CHANNELS = 3


def float_twin(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Deep copy of ``model`` with static layers as float Conv2d/Linear/Add; returns (twin, {fqn: static})."""
    twin = copy.deepcopy(model)
    static: dict[str, nn.Module] = {}
    for fqn, m in list(twin.named_modules()):
        if isinstance(m, (QStaticConv2d, QStaticLinear)):
            static[fqn] = m
            twin.set_submodule(fqn, _float_layer(m))
        elif isinstance(m, QStaticAdd):
            static[fqn] = m
            twin.set_submodule(fqn, Add())
        elif isinstance(m, QuantizedWeightModule):
            raise LowbitError(
                f"ONNX export covers float and StaticW8A8 models; {fqn} is {type(m).__name__} "
                "(weight-only and dynamic layers are not exported yet)"
            )
    return twin, static


def _float_layer(q: nn.Module) -> nn.Module:
    w = q.dequantized_weight(torch.float32)
    if isinstance(q, QStaticConv2d):
        c = q.conv
        m = nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                      c["dilation"], c["groups"], bias=q.bias is not None)  # fmt: skip
        w = w.reshape(q.weight_shape)
    else:
        m = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    m.weight = nn.Parameter(w, requires_grad=False)
    if q.bias is not None:
        m.bias = nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
    return m


def example_from_spec(spec: dict) -> torch.Tensor | dict[str, torch.Tensor]:
    """One-row example inputs from ``input_spec`` output (recorded at calibration, saved in checkpoints).

    Float inputs are seeded normal noise, integer inputs ones (a valid token id); an ``attention_mask``
    gets a 0 in its last position so the exported graph keeps the masking path."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, s in spec.items():
        shape, dtype = [1, *s["shape"][1:]], getattr(torch, s["dtype"])
        t = (
            torch.randn(shape, generator=g).to(dtype)
            if dtype.is_floating_point
            else torch.ones(shape, dtype=dtype)
        )
        if name == "attention_mask" and t.dim() == 2 and t.shape[1] > 1:
            t[:, -1] = 0
        out[name] = t
    return out["input"] if list(out) == ["input"] else out


def export_onnx(
    model: nn.Module,
    example: torch.Tensor | dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (float or StaticW8A8) as ONNX to ``path`` atomically; returns the path.

    ``example``: one input batch (a tensor, or a mapping of named tensors such as tokenizer output).
    Dimension 0 of every input is dynamic, and so is dimension 1 of 2-d named inputs (sequence length).
    """
    import onnx

    twin, static = float_twin(model)
    graph_bytes = _torch_export(twin.eval(), example)
    proto = onnx.load_from_string(graph_bytes)
    rewriter = _QDQRewriter(proto)
    for fqn, q in static.items():
        rewriter.quantize_layer(fqn, q)
    rewriter.finish()
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString(), overwrite)
    return Path(path)


def _torch_export(model: nn.Module, example) -> bytes:
    names = list(example) if isinstance(example, dict) else ["input"]
    tensors = list(example.values()) if isinstance(example, dict) else [example]
    axes = {}
    for n, t in zip(names, tensors, strict=True):
        axes[n] = {0: "batch"} | ({1: "sequence"} if t.dim() == 2 and isinstance(example, dict) else {})

    class Wrapped(nn.Module):  # positional inputs in a fixed order, one tensor out
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(names, args, strict=True))) if isinstance(example, dict) else (
                self.model(*args))  # fmt: skip
            return out if isinstance(out, torch.Tensor) else out[0]

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapped(), tuple(tensors), buf, dynamo=False, opset_version=OPSET, do_constant_folding=False,
            input_names=names, output_names=["output"], dynamic_axes=axes | {"output": {0: "batch"}},
        )  # fmt: skip
    return buf.getvalue()


class _QDQRewriter:
    """In-place QDQ rewrite of an exported graph, layer by layer (see the module docstring)."""

    def __init__(self, proto) -> None:
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_nodes: list = []  # inserted nodes; ``finish`` puts everything in topological order
        self.dropped: set[str] = set()  # first outputs of removed nodes (protobuf wrappers have no stable id)
        self.pruned: list[str] = []  # static layers absent from the graph (e.g. an unused pooler)
        self.input_dq: dict[tuple, str] = {}  # (tensor, scale, zero point) -> its Q/DQ output

    def _consumers(self, name: str):
        return [n for n in self.graph.node if name in n.input]

    def quantize_layer(self, fqn: str, q: nn.Module) -> None:
        if isinstance(q, QStaticAdd):
            return self._add(fqn, q)
        wname = f"model.{fqn}.weight"  # the exporter wraps the model as .model
        users = self._consumers(wname)
        if not users:  # the exporter pruned it: its output never reaches the graph's output
            self.pruned.append(fqn)
            return
        if len(users) != 1:
            raise LowbitError(f"ONNX export: cannot find the layer {fqn} in the exported graph")
        node = users[0]
        if node.op_type in ("Conv", "Gemm"):
            pad = _channel_pad(q)
            self._weight_axis0(fqn, q, node, wname, pad)
            self._activation(fqn, q, node, node.output[0], pad)
        elif node.op_type == "Transpose":
            self._transposed_matmul(fqn, q, node, wname)
        else:
            raise LowbitError(f"ONNX export: {fqn} exported as {node.op_type}, which lowbit cannot quantize")

    def _add(self, fqn: str, q: QStaticAdd) -> None:
        """Output Q/DQ after the Add node the exporter wrote for module ``fqn`` (found by its scope name)."""
        nodes = [n for n in self.graph.node if n.op_type == "Add" and n.name.startswith(_scope(fqn) + "/")]
        if len(nodes) != 1:
            raise LowbitError(f"ONNX export: {len(nodes)} Add nodes named {_scope(fqn)}/... for {fqn}, not 1")
        self._requantize_output(fqn, q, nodes[0].output[0])

    # -- pieces -------------------------------------------------------------------------------------

    def _add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def _dq(self, src: str, scale: str, zp: str, out: str, axis: int | None = None) -> None:
        from onnx import helper

        kw = {"axis": axis} if axis is not None else {}
        self.new_nodes.append(helper.make_node("DequantizeLinear", [src, scale, zp], [out], **kw))

    def _qdq(
        self, src: str, out: str, scale: float, zp: np.ndarray, tag: str, pad: int = 0, fmt=None
    ) -> None:
        """QuantizeLinear -> DequantizeLinear from ``src`` to ``out``; ``pad`` > 0 appends that many
        channels (dim 1) of zero-point codes between the two; a ``fmt`` narrower than 8 bits clips
        the codes to its range between the two (``Clip``)."""
        from onnx import helper

        s = self._add_init(f"{tag}_scale", np.array(scale, np.float32))
        z = self._add_init(f"{tag}_zero_point", zp)
        codes = f"{tag}_q"
        self.new_nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [codes]))
        if fmt is not None and fmt.bits < 8:
            lo = self._add_init(f"{tag}_qmin", np.array(fmt.qmin, zp.dtype))
            hi = self._add_init(f"{tag}_qmax", np.array(fmt.qmax, zp.dtype))
            self.new_nodes.append(helper.make_node("Clip", [codes, lo, hi], [f"{codes}_clipped"]))
            codes = f"{codes}_clipped"
        if pad:
            pads = self._add_init(f"{tag}_pads", np.array([0, 0, 0, 0, 0, pad, 0, 0], np.int64))
            value = self._add_init(f"{tag}_pad_value", zp.reshape(()))
            self.new_nodes.append(helper.make_node("Pad", [codes, pads, value], [f"{codes}_padded"]))
            codes = f"{codes}_padded"
        self._dq(codes, s, z, out)

    def _weights(self, fqn: str, q, transpose: bool, pad: int = 0) -> tuple[str, str, str]:
        codes = weight_values(q).numpy()
        codes = codes.reshape(q.weight_shape) if isinstance(q, QStaticConv2d) else codes
        if pad:  # zero weights for the zero input channels _qdq appends
            codes = np.pad(codes, [(0, 0), (0, pad), (0, 0), (0, 0)])
        codes = np.ascontiguousarray(codes.T) if transpose else codes
        w = self._add_init(f"{fqn}.weight_quantized", codes.astype(np.int8))
        s = self._add_init(f"{fqn}.weight_scale", q.scale.float().reshape(-1).numpy())
        z = self._add_init(f"{fqn}.weight_zero_point", np.zeros(q.rows, np.int8))
        return w, s, z

    def _bias(self, fqn: str, q) -> str:
        bias_q, _, _ = integer_params(q)
        b = self._add_init(f"{fqn}.bias_quantized", bias_q.numpy().astype(np.int32))
        bs = (q.input_scale.double() * q.scale.double().reshape(-1)).float().numpy()
        s = self._add_init(f"{fqn}.bias_scale", bs)
        z = self._add_init(f"{fqn}.bias_zero_point", np.zeros(q.rows, np.int32))
        self._dq(b, s, z, f"{fqn}.bias_dq", axis=0)
        return f"{fqn}.bias_dq"

    def _input(self, fqn: str, q, node, index: int, pad: int = 0) -> None:
        """Q/DQ (``pad`` channels appended, see ``_qdq``) of ``node``'s input ``index``; layers reading
        one tensor alike (q/k/v projections) share one pair, as ONNX Runtime's quantizer writes it."""
        src, scale = node.input[index], float(q.input_scale)
        zp = q.input_zero_point.numpy().copy()
        key = (src, scale, zp.dtype.str, zp.tobytes(), pad, q.act_spec.format)
        if key not in self.input_dq:
            self._qdq(src, f"{fqn}.input_dq", scale, zp, f"{fqn}.input", pad, q.act_spec.fmt)
            self.input_dq[key] = f"{fqn}.input_dq"
        node.input[index] = self.input_dq[key]

    def _activation(self, fqn: str, q, node, out_name: str, pad: int = 0) -> None:
        """Input Q/DQ before ``node``; output Q/DQ after ``out_name`` (consumers keep reading its name)."""
        self._input(fqn, q, node, 0, pad)
        if q.requantize_output:
            self._requantize_output(fqn, q, out_name)

    def _requantize_output(self, fqn: str, q, out_name: str) -> None:
        """Q/DQ with ``q``'s output qparams between ``out_name``'s producer and its consumers."""
        producer = next(n for n in self.graph.node if out_name in n.output)
        raw = f"{fqn}.output_float"
        producer.output[list(producer.output).index(out_name)] = raw
        zp = q.output_zero_point.numpy().copy()
        self._qdq(raw, out_name, float(q.output_scale), zp, f"{fqn}.output", fmt=q.act_spec.fmt)

    def _weight_axis0(self, fqn: str, q, node, wname: str, pad: int = 0) -> None:
        w, s, z = self._weights(fqn, q, transpose=False, pad=pad)
        self._dq(w, s, z, f"{fqn}.weight_dq", axis=0)
        node.input[1] = f"{fqn}.weight_dq"
        if q.bias is not None and (q.requantize_output or node.op_type == "Gemm"):
            node.input[2] = self._bias(fqn, q)
            self._drop_init(f"model.{fqn}.bias")
        self._drop_init(wname)

    def _transposed_matmul(self, fqn: str, q, transpose, wname: str) -> None:
        (matmul,) = self._consumers(transpose.output[0])
        w, s, z = self._weights(fqn, q, transpose=True)
        self._dq(w, s, z, f"{fqn}.weight_dq", axis=1)
        matmul.input[1] = f"{fqn}.weight_dq"
        self.dropped.add(transpose.output[0])
        self._drop_init(wname)
        out = matmul.output[0]
        if q.bias is not None:
            (add,) = self._consumers(out)
            out = add.output[0]
        self._activation(fqn, q, matmul, out)

    def _drop_init(self, name: str) -> None:
        if name in self.inits:
            self.graph.initializer.remove(self.inits.pop(name))

    def finish(self) -> None:
        """Replace the node list: kept nodes plus inserted ones, in topological order."""
        nodes = [n for n in self.graph.node if n.output[0] not in self.dropped] + self.new_nodes
        ordered = _toposort(nodes, self.graph)
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def _channel_pad(q: nn.Module) -> int:
    """Zero input channels to append to ``q``'s input in the export (module docstring); 0 for none."""
    if not isinstance(q, QStaticConv2d) or q.conv["groups"] != 1:
        return 0
    channels = q.conv["in_channels"]
    return -channels % CHANNEL_MULTIPLE if channels >= MIN_PADDED_CHANNELS else 0


def _scope(fqn: str) -> str:
    """The TorchScript exporter's node-name prefix of module ``fqn`` of the wrapped model:
    "features.3.add" -> "/model/features/features.3/add", "1.add" -> "/model/model.1/add"
    (an index joins its parent's name)."""
    parts = ["model", *fqn.split(".")]
    return "/" + "/".join(f"{parts[i - 1]}.{p}" if p.isdigit() else p for i, p in enumerate(parts))


def _toposort(nodes: list, graph) -> list:
    """Kahn's algorithm, ties broken by list position (so the exporter's order survives where it can)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    waiting = [{p for p in (producer.get(x) for x in n.input if x not in known) if p is not None}
               for n in nodes]  # fmt: skip
    for n in nodes:
        missing = [x for x in n.input if x not in known and x not in producer]
        if missing:
            raise LowbitError(f"ONNX export: {n.op_type} node reads {missing[0]!r}, which nothing produces")
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting):
        for d in deps:
            users.setdefault(d, []).append(i)
    heap = [i for i, deps in enumerate(waiting) if not deps]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        out.append(nodes[i])
        for u in users.get(i, []):
            waiting[u].discard(i)
            if not waiting[u]:
                heapq.heappush(heap, u)
    if len(out) != len(nodes):
        raise LowbitError("ONNX export: the rewritten graph has a cycle")
    return out
