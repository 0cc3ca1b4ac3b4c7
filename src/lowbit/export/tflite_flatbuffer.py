"""TFLite flatbuffer writer for ``lowbit.export.tflite``: tensors, constant buffers and builtin operators of
one subgraph, serialized with the schema that ships in ``ai_edge_litert`` (flatc's object API,
``schema_py_generated.py``) and the ``flatbuffers`` package. Both are imported when a ``TFLiteWriter`` is
made, not with lowbit.

Conventions the interpreter relies on and this writer keeps: buffer 0 is the empty sentinel that every
non-constant tensor points at; each constant has its own buffer, its bytes 16-byte aligned (as the
TFLite converter writes them); operator codes carry the version the converter would give the op for its
input type (``version``); the model has one signature, ``serving_default``, with the graph inputs and
outputs under the names given to ``finish``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.core.errors import LowbitError

# op -> its BuiltinOptions table ('' for none)
OPTIONS = {
    "CONV_2D": "Conv2DOptions",
    "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions",
    "ADD": "AddOptions",
    "MEAN": "ReducerOptions",
    "RESHAPE": "ReshapeOptions",
    "PAD": "PadOptions",
    "TRANSPOSE": "TransposeOptions",
    "QUANTIZE": "QuantizeOptions",
    "DEQUANTIZE": "DequantizeOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "RELU": "",
    "RELU6": "",
}
# Versions the TFLite converter gives ops with int8 inputs (tensorflow/lite/tools/versioning/op_version.cc);
# float inputs and the ops missing here are version 1.
INT8_VERSIONS = {
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 4,
    "ADD": 2,
    "MEAN": 2,
    "PAD": 2,
    "TRANSPOSE": 2,
    "DEQUANTIZE": 2,
    "MAX_POOL_2D": 2,
    "AVERAGE_POOL_2D": 2,
    "RELU": 2,
    "RELU6": 2,
}
PER_CHANNEL_DEQUANTIZE_VERSION = 5
DTYPES = {"float32": "FLOAT32", "int8": "INT8", "int32": "INT32"}
ALIGNMENT = 16


@dataclass(frozen=True)
class QParams:
    """Affine quantization of a tensor: ``real = scale * (code - zero_point)``; one entry per tensor, or
    one per slice along ``axis`` (per-channel)."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int) -> QParams:
        return cls((float(np.float32(scale)),), (int(zero_point),))

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the graph being written: its index, name, shape (batch first) and dtype name."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    qparams: QParams | None = None


class _AlignedBuffer:
    """A ``Buffer`` table whose bytes start on an ``ALIGNMENT`` boundary (flatc's ``BufferT`` aligns to 1)."""

    def __init__(self, schema, data: bytes | None) -> None:
        self.schema, self.data = schema, data

    def Pack(self, builder) -> int:  # noqa: N802 - the name flatc's object API calls
        vec = None
        if self.data:
            n = len(self.data)
            builder.StartVector(1, n, ALIGNMENT)
            builder.head -= n
            builder.Bytes[builder.head : builder.head + n] = self.data
            vec = builder.EndVector()
        self.schema.BufferStart(builder)
        if vec is not None:
            self.schema.BufferAddData(builder, vec)
        return self.schema.BufferEnd(builder)


def load_schema():
    """``(ai_edge_litert.schema_py_generated, flatbuffers)``, or a ``LowbitError`` saying what to install."""
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as e:
        raise LowbitError(
            f"TFLite export needs the ai-edge-litert and flatbuffers packages ({e.name} is missing): "
            "pip install lowbit[tflite]"
        ) from None
    return schema, flatbuffers


class TFLiteWriter:
    """One TFLite subgraph under construction: ``tensor``/``const`` add tensors, ``op`` adds operators
    (in execution order), ``finish`` returns the serialized model."""

    def __init__(self) -> None:
        self.schema, self.flatbuffers = load_schema()
        self.tensors: list = []
        self.infos: list[TensorInfo] = []
        self.buffers: list = [_AlignedBuffer(self.schema, None)]  # 0: the empty sentinel
        self.operators: list = []
        self.kinds: list[str] = []  # operator names in order (export stats)
        self.opcodes: dict[tuple[str, int], int] = {}
        self.names: set[str] = set()

    def tensor(
        self,
        name: str,
        shape,
        dtype: str,
        qparams: QParams | None = None,
        data: np.ndarray | None = None,
        dynamic_batch: bool = False,
    ) -> TensorInfo:
        """Add a tensor (a constant when ``data`` is given); names are made unique with a suffix."""
        s = self.schema
        base, i = name, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        shape = tuple(int(d) for d in shape)
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), getattr(s.TensorType, DTYPES[dtype])
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        if qparams is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = list(qparams.scale), list(qparams.zero_point)
            q.quantizedDimension = qparams.axis
            t.quantization = q
        if data is not None:
            arr = np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("<"))
            if arr.shape != shape:
                raise LowbitError(f"TFLite export: constant {name} has shape {arr.shape}, expected {shape}")
            t.buffer = len(self.buffers)
            self.buffers.append(_AlignedBuffer(s, arr.tobytes()))
        info = TensorInfo(len(self.tensors), name, shape, dtype, qparams)
        self.tensors.append(t)
        self.infos.append(info)
        return info

    def const(self, name: str, data: np.ndarray, qparams: QParams | None = None) -> TensorInfo:
        """A constant tensor holding ``data`` (its dtype and shape)."""
        data = np.asarray(data)
        return self.tensor(name, data.shape, str(data.dtype), qparams, data)

    def op(self, kind: str, inputs: list[TensorInfo], outputs: list[TensorInfo], **options):
        """Append builtin operator ``kind`` (a key of ``OPTIONS``) and return it; ``options`` are fields of
        its options table by their flatc names (``strideW=2``), enums by name (``padding="VALID"``)."""
        s = self.schema
        if kind not in OPTIONS:
            raise LowbitError(f"TFLite export: no writer for operator {kind}")
        op = s.OperatorT()
        op.opcodeIndex = self._opcode(kind, _version(kind, inputs))
        op.inputs, op.outputs = [t.index for t in inputs], [t.index for t in outputs]
        table = OPTIONS[kind]
        if table:
            opts = getattr(s, f"{table}T")()
            for key, value in options.items():
                if not hasattr(opts, key):
                    raise LowbitError(f"TFLite export: {table} has no field {key}")
                setattr(opts, key, _enum(s, key, value))
            op.builtinOptionsType, op.builtinOptions = getattr(s.BuiltinOptions, table), opts
        self.operators.append(op)
        self.kinds.append(kind)
        return op

    def fuse_activation(self, op, kind: str) -> bool:
        """Make operator ``op`` (from ``op``) apply ``kind`` ("RELU" or "RELU6") to its output, on top of
        a RELU/RELU6 it has (ReLU6 after ReLU, or ReLU after ReLU6, is ReLU6); False where it cannot."""
        acts = self.schema.ActivationFunctionType
        opts = op.builtinOptions
        have = getattr(opts, "fusedActivationFunction", None)
        if have not in (acts.NONE, acts.RELU, acts.RELU6):
            return False
        opts.fusedActivationFunction = acts.RELU6 if acts.RELU6 in (have, getattr(acts, kind)) else acts.RELU
        return True

    def _opcode(self, kind: str, version: int) -> int:
        key = (kind, version)
        if key not in self.opcodes:
            self.opcodes[key] = len(self.opcodes)
        return self.opcodes[key]

    def finish(
        self, inputs: dict[str, TensorInfo], outputs: dict[str, TensorInfo], description: str
    ) -> bytes:
        """The serialized model (file identifier ``TFL3``) with graph ``inputs``/``outputs`` by name."""
        s = self.schema
        graph = s.SubGraphT()
        graph.tensors, graph.operators, graph.name = self.tensors, self.operators, "main"
        graph.inputs = [t.index for t in inputs.values()]
        graph.outputs = [t.index for t in outputs.values()]
        signature = s.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = "serving_default", 0
        signature.inputs = [_tensor_map(s, n, t) for n, t in inputs.items()]
        signature.outputs = [_tensor_map(s, n, t) for n, t in outputs.items()]
        model = s.ModelT()
        model.version, model.description = 3, description
        model.operatorCodes = [_operator_code(s, k, v) for k, v in self.opcodes]
        model.subgraphs, model.buffers, model.signatureDefs = [graph], self.buffers, [signature]
        size = sum(len(b.data or b"") for b in self.buffers)
        builder = self.flatbuffers.Builder(size + (1 << 20))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _version(kind: str, inputs: list[TensorInfo]) -> int:
    if not inputs or inputs[0].dtype != "int8":
        return 1
    if kind == "DEQUANTIZE" and inputs[0].qparams is not None and inputs[0].qparams.per_channel:
        return PER_CHANNEL_DEQUANTIZE_VERSION
    return INT8_VERSIONS.get(kind, 1)


def _enum(schema, key: str, value):
    enums = {"padding": schema.Padding, "fusedActivationFunction": schema.ActivationFunctionType}
    return getattr(enums[key], value) if key in enums and isinstance(value, str) else value


def _tensor_map(schema, name: str, t: TensorInfo):
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, t.index
    return m


def _operator_code(schema, kind: str, version: int):
    code = schema.OperatorCodeT()
    code.builtinCode = getattr(schema.BuiltinOperator, kind)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)  # the int8 field old readers look at
    code.version = version
    return code
