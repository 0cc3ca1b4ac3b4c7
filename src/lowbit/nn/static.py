"""Statically quantized layers (W8A8 with calibrated activation ranges): ``QStaticLinear``, ``QStaticConv2d``,
``QStaticAdd``.

Weights are stored like ``QLinear``'s (symmetric, one scale per output channel; int8 from ``StaticW8A8``,
int2..int7, ternary or binary from quantization-aware training; a conv weight ``(out, in / groups, kh, kw)``
is held as ``(out, in / groups * kh * kw)`` rows). Activations have fixed per-tensor qparams found by
calibration or training (uint8/int8, or 2..7-bit codes held in those dtypes), one pair for the input and
one for the output:

| buffer                                  | shape | dtype                                   |
|-----------------------------------------|-------|-----------------------------------------|
| `input_scale`, `output_scale`           | ()    | float32                                 |
| `input_zero_point`, `output_zero_point` | ()    | code dtype of `act_spec` (uint8 / int8) |

A forward quantizes the float input, runs the integer-only op (int8 x int8 -> int32 accumulation, int32
bias, fixed-point requantization; ``lowbit.kernels.integer``) and dequantizes the output codes, so
layers compose with float ops between them exactly as ONNX QDQ graphs do. A layer with
``requantize_output = False`` returns ``float32(acc) * x_scale * w_scale + bias`` instead (ONNX Runtime's
MatMulIntegerToFloat): for outputs that only float ops read (residual adds, LayerNorm, logits).

``Add`` is a float residual add written as a module (``x + f(x)`` in a model's forward becomes
``self.add(x, f(x))``) so that static quantization can observe and quantize its output: ``QStaticAdd``
returns ``dq(q(a + b))`` with calibrated output qparams, which ONNX Runtime runs as QLinearAdd
(``DQ, DQ -> Add -> Q``); their outputs differ by at most one code (QLinearAdd rescales each input to
the output scale before adding, float32 rounding differs at ties).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.compiler import is_compiling

from lowbit.core.errors import LowbitError
from lowbit.core.spec import PerChannel, PerTensor, QuantSpec
from lowbit.kernels import dispatch
from lowbit.kernels.integer import dequantize_activation, quantize_activation
from lowbit.kernels.ops import call
from lowbit.nn.modules import QLinear, QuantizedModule, QuantizedWeightModule, register_qmodule, scale_problem

WEIGHT_SPEC = QuantSpec("int8", True, PerChannel(0), "float32")
ACTIVATION_SPECS = {
    "uint8": QuantSpec("uint8", False, PerTensor(), "float32"),
    "int8": QuantSpec("int8", True, PerTensor(), "float32"),
}


def activation_spec(bits: int, symmetric: bool = False) -> QuantSpec:
    """Per-tensor activation spec of ``bits``: ``int{bits}`` symmetric (2..8) or ``uint{bits}`` with a
    zero point (1..8). Codes are held as uint8/int8 whatever the width (``requantize`` clamps to the
    format)."""
    low = 2 if symmetric else 1
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 8:
        raise LowbitError(
            f"{'symmetric ' if symmetric else ''}activation bits must be {low}..8, got {bits!r}"
        )
    return QuantSpec(f"int{bits}" if symmetric else f"uint{bits}", symmetric, PerTensor(), "float32")


def activation_problem(act_spec: QuantSpec) -> str | None:
    """Why ``act_spec`` is not a static activation spec (``activation_spec(bits, symmetric)``), or None."""
    act = act_spec.fmt
    if act.kind != "int" or act_spec != activation_spec(act.bits, act.qmin < 0):
        return f"static activations must be int<b> symmetric or uint<b> asymmetric per tensor, got {act_spec}"
    return None


def static_spec_problem(spec: QuantSpec, act_spec: QuantSpec) -> str | None:
    """Why a static layer cannot hold ``spec`` weights and ``act_spec`` activations, or None.

    Weights: symmetric, one float32 scale per output channel, an integer format (int2..int8, ternary)
    or ``binary`` (levels -1 and +1). Activations: ``activation_problem``.
    """
    fmt = spec.fmt
    weight_ok = fmt.kind == "int" or fmt.name == "binary"
    if not (
        weight_ok and spec.symmetric and spec.granularity == PerChannel(0) and spec.scale_dtype == "float32"
    ):
        return (
            f"static weights must be symmetric integer/binary codes per output channel (float32), got {spec}"
        )
    return activation_problem(act_spec)


class StaticActivations:
    """Mixin: calibrated per-tensor qparams of a layer's input and output activations."""

    def _init_activation_buffers(self, act_spec: QuantSpec) -> None:
        problem = static_spec_problem(self.spec, act_spec)
        if problem:
            raise LowbitError(problem)
        self.act_spec = act_spec
        self.requantize_output = True
        for side in ("input", "output"):
            self.register_buffer(f"{side}_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer(f"{side}_zero_point", torch.zeros((), dtype=act_spec.fmt.torch_dtype))

    def set_activation_qparams(self, side: str, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store calibrated qparams (0-d ``scale`` float32, ``zero_point`` code dtype) of ``side``."""
        if side not in ("input", "output") or scale.numel() != 1 or zero_point.numel() != 1:
            raise LowbitError(f"activation qparams must be one scale and zero point per tensor ({side})")
        setattr(self, f"{side}_scale", scale.reshape(()).float().clone())
        setattr(self, f"{side}_zero_point", zero_point.reshape(()).to(self.act_spec.fmt.torch_dtype).clone())

    def state_problem(self) -> str | None:
        for side in ("input", "output"):
            problem = scale_problem(f"{side}_scale", getattr(self, f"{side}_scale"))
            if problem:
                return problem
        return super().state_problem()

    def activation_entry(self) -> dict:
        return {"act_spec": self.act_spec.to_dict(), "requantize_output": self.requantize_output}

    def _restore(self, entry: dict):
        self.requantize_output = bool(entry.get("requantize_output", True))
        return self


def _act_spec(entry: dict) -> QuantSpec:
    return QuantSpec.from_dict(entry["act_spec"])


@register_qmodule(None)
class QStaticLinear(StaticActivations, QLinear):
    """``y = dq(requant(q(x) @ Wq.T + bias_q))``: W8A8 Linear with calibrated activation ranges."""

    KERNEL_OP = "static_linear"
    ENTRY_FIELDS = QLinear.ENTRY_FIELDS | {"act_spec": "spec", "requantize_output": "bool"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec = WEIGHT_SPEC,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        act_spec: QuantSpec = ACTIVATION_SPECS["uint8"],
    ) -> None:
        super().__init__(in_features, out_features, spec, bias, dtype, backend)
        self._init_activation_buffers(act_spec)

    @classmethod
    def from_float(cls, m: nn.Linear, spec: QuantSpec, act_spec: QuantSpec) -> QStaticLinear:
        return cls(m.in_features, m.out_features, spec, m.bias is not None, m.weight.dtype, act_spec=act_spec)

    @classmethod
    def from_entry(cls, e: dict) -> QStaticLinear:
        spec, dtype = QuantSpec.from_dict(e["spec"]), getattr(torch, e["dtype"])
        q = cls(e["in_features"], e["out_features"], spec, e["bias"], dtype, act_spec=_act_spec(e))
        return q._restore(e)

    def config_entry(self) -> dict:
        return super().config_entry() | self.activation_entry()


@register_qmodule(None)
class QStaticConv2d(StaticActivations, QuantizedWeightModule):
    """W8A8 ``nn.Conv2d`` (zero padding; depthwise and grouped included) with calibrated activation ranges."""

    KERNEL_OP = "static_conv2d"
    ENTRY_FIELDS = QuantizedWeightModule.ENTRY_FIELDS | {
        "conv": "conv",
        "bias": "bool",
        "act_spec": "spec",
        "requantize_output": "bool",
    }

    def __init__(
        self,
        conv: dict,
        spec: QuantSpec = WEIGHT_SPEC,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        act_spec: QuantSpec = ACTIVATION_SPECS["uint8"],
        backend: str | None = None,
    ) -> None:
        """``conv``: in/out_channels, kernel_size, stride, padding, dilation, groups (ints or pairs)."""
        super().__init__()
        self.conv = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in conv.items()}
        c = self.conv
        if c["in_channels"] % c["groups"] or c["out_channels"] % c["groups"]:
            raise LowbitError(f"channels {c['in_channels']}/{c['out_channels']} not divisible by groups")
        if isinstance(c["padding"], str):
            raise LowbitError(f"padding={c['padding']!r} is not supported; use explicit padding")
        kh, kw = c["kernel_size"]
        self.rows, self.cols = c["out_channels"], c["in_channels"] // c["groups"] * kh * kw
        self.backend = backend
        self._init_weight_buffers(spec, dtype)
        self.register_buffer("bias", torch.zeros(self.rows, dtype=dtype) if bias else None)
        self._init_activation_buffers(act_spec)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        c = self.conv
        return (c["out_channels"], c["in_channels"] // c["groups"], *c["kernel_size"])

    @classmethod
    def from_float(cls, m: nn.Conv2d, spec: QuantSpec, act_spec: QuantSpec) -> QStaticConv2d:
        if m.padding_mode != "zeros":
            raise LowbitError(f"Conv2d padding_mode={m.padding_mode!r} is not supported (zeros only)")
        conv = {k: getattr(m, k) for k in CONV_KEYS}
        return cls(conv, spec, m.bias is not None, m.weight.dtype, act_spec)

    @classmethod
    def from_entry(cls, e: dict) -> QStaticConv2d:
        spec, dtype = QuantSpec.from_dict(e["spec"]), getattr(torch, e["dtype"])
        return cls(e["conv"], spec, e["bias"], dtype, _act_spec(e))._restore(e)

    def config_entry(self) -> dict:
        e = super().config_entry() | {"conv": dict(self.conv), "bias": self.bias is not None}
        return e | self.activation_entry()

    def extra_repr(self) -> str:
        c = self.conv
        return f"{super().extra_repr()}, k={c['kernel_size']} s={c['stride']} g={c['groups']}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_compiling():
            return call(self.KERNEL_OP, self, x)
        return dispatch(self.KERNEL_OP, self, x, self.backend)(x, self)


class Add(nn.Module):
    """Float ``a + b`` as a module (a residual add that ``StaticW8A8`` can observe and quantize)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


@register_qmodule(None)
class QStaticAdd(QuantizedModule):
    """``y = dq(q(a + b))``: an ``Add`` whose output is requantized with calibrated per-tensor qparams."""

    ENTRY_FIELDS = {"act_spec": "spec"}

    def __init__(self, act_spec: QuantSpec = ACTIVATION_SPECS["uint8"]) -> None:
        super().__init__()
        problem = activation_problem(act_spec)
        if problem:
            raise LowbitError(problem)
        self.act_spec = act_spec
        self.register_buffer("output_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("output_zero_point", torch.zeros((), dtype=act_spec.fmt.torch_dtype))

    set_activation_qparams = StaticActivations.set_activation_qparams

    def state_problem(self) -> str | None:
        return scale_problem("output_scale", self.output_scale)

    @classmethod
    def from_entry(cls, e: dict) -> QStaticAdd:
        return cls(_act_spec(e))

    def config_entry(self) -> dict:
        return {"type": type(self).__name__, "act_spec": self.act_spec.to_dict()}

    def extra_repr(self) -> str:
        return f"{self.act_spec.format} output, scale {float(self.output_scale):.4g}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return dequantize_activation(quantize_activation(y, self, "output"), self).to(y.dtype)


CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
STATIC_FLOAT_TO_Q = {nn.Linear: QStaticLinear, nn.Conv2d: QStaticConv2d}
