"""Quantization configs: frozen dataclasses with a ``version`` and a JSON round trip.

``config_from_dict`` is the edge where saved or user-written configs are validated: unknown types,
unknown fields and newer versions are refused with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from lowbit.core.errors import FormatVersionError, LowbitError
from lowbit.core.formats import get_format
from lowbit.core.spec import PerChannel, PerGroup, QuantSpec
from lowbit.observers import OBSERVERS

CONFIGS: dict[str, type[QuantConfig]] = {}


def register_config(cls: type[QuantConfig]) -> type[QuantConfig]:
    CONFIGS[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class QuantConfig:
    """Base of all configs. ``VERSION`` is the newest version this code reads."""

    VERSION = 1

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}

    @property
    def needs_calib(self) -> bool:
        """Whether quantizing with this config takes calibration batches (``quantize_(..., calib=)``)."""
        return False

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """Fields (no "type") of an older version's dict, with what that version ran for fields it lacks."""
        return d


def config_from_dict(d: dict) -> QuantConfig:
    """Rebuild a config from ``to_dict`` output, validating type, fields and version."""
    d = dict(d)
    name = d.pop("type", None)
    if name not in CONFIGS:
        raise LowbitError(f"unknown quantization config type {name!r}; known: {', '.join(CONFIGS)}")
    cls = CONFIGS[name]
    if int(d.get("version", 1)) > cls.VERSION:
        raise FormatVersionError(
            f"{name} version {d['version']} is newer than this lowbit reads ({cls.VERSION}); upgrade lowbit"
        )
    d = cls.upgrade(d)
    known = {f.name for f in fields(cls)}
    if set(d) - known:
        raise LowbitError(f"unknown {name} fields: {sorted(set(d) - known)}")
    return cls(**d)


# ``WeightOnly.format`` -> core format (None: int{bits} / uint{bits} from ``bits`` and ``symmetric``)
WEIGHT_FORMATS = {"int": None, "nf4": "nf4", "fp4": "fp4_e2m1", "fp8": "fp8_e4m3", "log2": "log2",
                  "ternary": "ternary", "binary": "binary", "kmeans": None}  # fmt: skip
# Weight formats named by themselves in scheme and candidate strings: a fixed grid under a scale, with an
# optional group size (nf4g64), or a fitted table of 2**bits levels (kmeans3).
FORMAT_NAME = re.compile(
    r"(?P<fmt>nf4|fp4|fp8|log2|ternary)(?:g(?P<group>\d+))?|(?P<km>kmeans)(?P<bits>[2-4])"
)
TABLE_METHODS = ("rtn", "gptq", "awq+gptq")  # fit format "kmeans" (awq's clipping search needs a range)
INT_ONLY_METHODS = ("hqq", "qat")  # fit integer zero points / train integer grids


def weight_spec(
    bits: int, group_size: int | None, symmetric: bool, scale_dtype: str, fmt: str = "int"
) -> QuantSpec:
    gran = PerGroup(group_size) if group_size else PerChannel(0)
    if fmt not in WEIGHT_FORMATS:
        raise LowbitError(f"unknown weight format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}")
    if fmt == "kmeans":  # one fitted table per output channel: group_size does not apply
        if not 2 <= bits <= 4:
            raise LowbitError(f"format kmeans takes 2..4 bits (tables of 4..16 levels), got {bits}")
        return QuantSpec(f"lut{bits}", True, PerChannel(0), scale_dtype)
    if fmt != "int":  # scale-only formats: no zero point, bits fixed by the format
        return QuantSpec(WEIGHT_FORMATS[fmt], True, gran, scale_dtype)
    if not 2 <= bits <= 8:
        raise LowbitError(f"weight bits must be 2..8, got {bits}")
    return QuantSpec(f"int{bits}" if symmetric else f"uint{bits}", symmetric, gran, scale_dtype)


LAYER_KEYS = ("format", "bits", "group_size", "symmetric")  # of a ``WeightOnly.layers`` entry


def _check_layer(fqn: object, entry: object) -> dict:
    """A copy of the ``WeightOnly.layers`` entry ``entry`` of ``fqn``; ``LowbitError`` naming ``fqn``
    for a non-string name, a non-mapping entry, unknown keys or values out of range."""
    if not isinstance(fqn, str) or not fqn:
        raise LowbitError(f"WeightOnly.layers keys must be module names (fqn strings), got {fqn!r}")
    if not isinstance(entry, Mapping):
        raise LowbitError(f"WeightOnly.layers[{fqn!r}] must be a mapping of {LAYER_KEYS}, got {entry!r}")
    unknown = sorted(set(entry) - set(LAYER_KEYS))
    if unknown:
        raise LowbitError(
            f"WeightOnly.layers[{fqn!r}]: unknown keys {unknown}; known: {', '.join(LAYER_KEYS)}"
        )
    bits, group = entry.get("bits"), entry.get("group_size")
    if "bits" in entry and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise LowbitError(f"WeightOnly.layers[{fqn!r}]: bits must be an integer 2..8, got {bits!r}")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        raise LowbitError(
            f"WeightOnly.layers[{fqn!r}]: group_size must be a positive integer, or 0 / None for one scale "
            f"per output channel, got {group!r}"
        )
    if not isinstance(entry.get("symmetric", False), bool):
        raise LowbitError(f"WeightOnly.layers[{fqn!r}]: symmetric must be true or false")
    fmt = entry.get("format", "int")
    if fmt not in WEIGHT_FORMATS:
        raise LowbitError(
            f"WeightOnly.layers[{fqn!r}]: unknown format {fmt!r}; known: {', '.join(WEIGHT_FORMATS)}"
        )
    if fmt == "kmeans" and ("bits" in entry and not 2 <= bits <= 4 or entry.get("group_size")):
        raise LowbitError(
            f"WeightOnly.layers[{fqn!r}]: format kmeans takes bits 2..4 and one table per output channel "
            "(group_size 0)"
        )
    if fmt not in ("int", "kmeans") and "bits" in entry and bits != get_format(WEIGHT_FORMATS[fmt]).bits:
        raise LowbitError(
            f"WeightOnly.layers[{fqn!r}]: format {fmt} has {get_format(WEIGHT_FORMATS[fmt]).bits} bits, "
            f"not {bits}; drop 'bits' or write format 'int'"
        )
    return dict(entry)


WEIGHT_METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "qat")
CALIB_METHODS = ("gptq", "awq", "awq+gptq", "qat")  # need calibration batches (``quantize_(..., calib=)``)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # of the calibration forwards (``WeightOnly``)


@register_config
@dataclass(frozen=True)
class WeightOnly(QuantConfig):
    """Weight-only quantization of Linear and Embedding layers; activations stay float.

    format: the weight codes. "int" (default): ``bits`` 2..8, symmetric int{bits} with zero point 0
    or asymmetric uint{bits} with a fitted integer zero point. Scale-only formats (no zero point;
    ``bits`` and ``symmetric`` do not apply): "nf4" (QLoRA's normal-float levels), "fp4" (e2m1),
    "fp8" (e4m3), "log2" (0 and +-2^-k, 4 bits), "ternary" (-1, 0, 1), "binary" (+-mean|w|); see
    ``lowbit.core.formats``. "kmeans": ``bits`` 2..4, a table of ``2**bits`` levels per output channel
    fitted by k-means (``lowbit.algorithms.kmeans``; diag(H)-weighted under gptq and awq+gptq, whose
    AWQ search uses uint{bits} as a proxy), group_size does not apply; methods rtn, gptq, awq+gptq.
    Methods hqq and qat take "int" only. Embeddings take ``format`` unless ``embedding_bits`` is set
    or it is "kmeans" (then int). group_size: elements per scale along the input dimension; None or 0
    = one scale per output channel. scale_dtype: storage dtype of scales. embedding_bits /
    embedding_group_size: for Embedding tables (and an LM head tied to one); None = same as the Linear
    layers, group 0 = per row.
    quantize_embeddings: False keeps Embedding tables float.

    method: how Linear weights are rounded (``lowbit.algorithms``):

    | method     | data | what                                                                      |
    |------------|------|---------------------------------------------------------------------------|
    | `rtn`      | no   | round to nearest, qparams from each block's min/max                       |
    | `hqq`      | no   | half-quadratic qparam search per block (never worse than RTN per block)   |
    | `gptq`     | yes  | column-by-column rounding with error feedback through the input Hessian   |
    | `awq`      | yes  | activation-aware per-channel scales folded into the norm/linear before,   |
    |            |      | then a per-block clipping search                                          |
    | `awq+gptq` | yes  | AWQ's scales, then GPTQ rounding (no clipping search)                     |
    | `qat`      | yes  | `awq+gptq`, then each block's weights, group scales and zero points are   |
    |            |      | trained against the float block's outputs (EfficientQAT's Block-AP)       |

    Methods with data run block by block on a Hugging Face decoder (``lowbit.transforms.sequential``);
    embeddings and the LM head use RTN (``hqq`` uses HQQ everywhere). damp: GPTQ dampening, a
    fraction of mean diag(H). act_order: GPTQ quantizes columns by descending diag(H) (group qparams
    then come from the original weight). mse_clip: GPTQ shrinks each group's range (1.0 .. 0.7 of
    min/max) to the least squared error before rounding, which lowers perplexity. awq_grid: AWQ search
    points (scales and clipping). true_sequential: GPTQ takes each Linear's Hessian from the block
    quantized up to it (``lowbit.transforms.block``), not from the float block; off by default: slower,
    and it does not lower perplexity.
    compute_dtype: matmul dtype of the calibration forwards (Hessians from the same inputs, summed in
    float32; weights rounded in float32): "bfloat16" (autocast), "float32", or "auto" = bfloat16
    where the hardware has native bf16 matmuls (CPUs with AMX or AVX512-BF16, CUDA GPUs that support
    it), else float32 (``lowbit.transforms.block.compute_dtype``). Native bf16 calibration is faster,
    at no cost in perplexity.
    train_epochs, train_lr, train_qparam_lr, train_batch (method ``qat``): passes over the calibration
    samples per block, peak AdamW learning rates of the latent weights and of the log scales / zero
    points (cosine decay), calibration samples per step (``lowbit.transforms.block_train``).
    train_target: what each block trains toward: "block", the float block's outputs on its quantized
    inputs, or "model", the float model's outputs of that block (``block_train.Training.target``).
    layers: per-layer formats (a mixed-precision plan): module fqn (e.g. "model.layers.3.mlp.down_proj")
    -> ``{"format": name, "bits": 2..8, "group_size": g (0 or None: per output channel), "symmetric":
    bool}``, every key optional, missing ones taken from this config (for an Embedding: from its
    embedding options).
    Each named module must be a Linear or Embedding the handler quantizes (checked before the model
    changes, ``lowbit.transforms.weight_only.check_layers``); an LM head tied to an embedding takes
    the embedding's format (an entry of its own must agree). Every method honours it
    (``linear_spec(fqn)``, ``embedding_spec(fqn)``; ``lowbit.transforms.block_round.BlockPlan``).
    Version 2 added method options, version 3 ``true_sequential``, version 4 ``compute_dtype``,
    version 5 method ``qat`` and its ``train_*`` options, version 6 ``layers``, version 7 ``format``;
    older dicts load as what they ran (``compute_dtype="float32"``, no per-layer formats, int codes).
    """

    VERSION = 7

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    embedding_bits: int | None = None
    embedding_group_size: int | None = None
    quantize_embeddings: bool = True
    method: str = "rtn"
    damp: float = 0.01
    act_order: bool = True
    mse_clip: bool = True
    awq_grid: int = 20
    true_sequential: bool = False
    compute_dtype: str = "auto"
    train_epochs: int = 2
    train_lr: float = 3e-3
    train_qparam_lr: float = 1e-2
    train_batch: int = 4
    train_target: str = "block"
    layers: dict[str, dict] = field(default_factory=dict, hash=False)
    format: str = "int"
    version: int = 7

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise LowbitError(f"WeightOnly.layers must map module names to formats, got {self.layers!r}")
        object.__setattr__(self, "layers", {k: _check_layer(k, v) for k, v in self.layers.items()})
        self.linear_spec()
        self.embedding_spec()
        if self.method not in WEIGHT_METHODS:
            known = ", ".join(WEIGHT_METHODS)
            raise LowbitError(f"unknown weight method {self.method!r}; available: {known}")
        formats = {self.format} | {e.get("format", self.format) for e in self.layers.values()}
        if self.method in INT_ONLY_METHODS and formats != {"int"}:
            other = sorted(formats - {"int"})
            raise LowbitError(
                f"method {self.method} fits integer grids only; format {other[0]} needs method rtn, gptq, "
                "awq or awq+gptq"
            )
        if "kmeans" in formats and self.method not in TABLE_METHODS:
            raise LowbitError(f"format kmeans takes method {', '.join(TABLE_METHODS)}, not {self.method}")
        if self.method != "rtn" and "binary" in formats:
            raise LowbitError(
                f"format binary (scale: mean |w|, no grid to search) takes method rtn, not {self.method}"
            )
        if not 0.0 <= self.damp < 1.0:
            raise LowbitError(f"damp must be in [0, 1), got {self.damp}")
        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise LowbitError(f"awq_grid must be a positive integer, got {self.awq_grid!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            known = ", ".join(COMPUTE_DTYPES)
            raise LowbitError(f"compute_dtype must be one of {known}, got {self.compute_dtype!r}")
        for key in ("train_epochs", "train_batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"{key} must be a positive integer, got {v!r}")
        for key in ("train_lr", "train_qparam_lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise LowbitError(f"{key} must be a learning rate in (0, 1), got {v!r}")
        if self.train_target not in ("block", "model"):
            raise LowbitError(f"train_target must be 'block' or 'model', got {self.train_target!r}")

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        return {"compute_dtype": "float32", **d} if int(d.get("version", 1)) < 4 else d

    @property
    def needs_calib(self) -> bool:
        return self.method in CALIB_METHODS

    def linear_spec(self, fqn: str | None = None) -> QuantSpec:
        """Spec of the Linear ``fqn``: its ``layers`` entry over this config's bits / group / symmetry."""
        return self._spec(fqn, self.bits, self.group_size)

    def embedding_spec(self, fqn: str | None = None) -> QuantSpec | None:
        """Spec of the Embedding ``fqn`` (its ``layers`` entry over the embedding options); None when
        embeddings stay float (``quantize_embeddings=False``)."""
        if not self.quantize_embeddings:
            return None
        bits = self.embedding_bits if self.embedding_bits is not None else self.bits
        group = self.embedding_group_size if self.embedding_group_size is not None else self.group_size
        # embedding_bits asks for int codes; tables (kmeans) are for Linears: embeddings take int{bits}
        fmt = self.format if self.embedding_bits is None and self.format != "kmeans" else "int"
        return self._spec(fqn, bits, group, fmt)

    def _spec(self, fqn: str | None, bits: int, group: int | None, fmt: str | None = None) -> QuantSpec:
        entry = self.layers.get(fqn, {}) if fqn is not None else {}
        bits, group = entry.get("bits", bits), entry.get("group_size", group)
        sym, fmt = entry.get("symmetric", self.symmetric), entry.get("format", fmt or self.format)
        return weight_spec(bits, group, sym, self.scale_dtype, fmt)


@register_config
@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """W8A8 dynamic quantization of Linear layers: int8 symmetric weights, one scale per output channel,
    activations quantized to int8 per token at run time (int32 accumulation on fast backends).

    scale_dtype: storage dtype of the weight scales. quantize_embeddings: Embedding tables (and an LM
    head tied to one) become int8 per row, weight-only (a lookup has no activation to quantize).
    """

    scale_dtype: str = "float32"
    quantize_embeddings: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        self.linear_spec()

    def linear_spec(self) -> QuantSpec:
        return weight_spec(8, None, True, self.scale_dtype)

    def embedding_spec(self) -> QuantSpec | None:
        return self.linear_spec() if self.quantize_embeddings else None


@register_config
@dataclass(frozen=True)
class SmoothQuant(QuantConfig):
    """W8A8 dynamic (as ``Int8Dynamic``: int8 weights per channel, activations per token at run time)
    after SmoothQuant: per-channel scales ``s`` move activation outliers into the weights
    (``x / s``, ``W * s``; ``lowbit.algorithms.smoothquant``), folded into the norm or linear before
    each group of Linears (``lowbit.transforms.mappings``). Needs calibration batches; runs block by
    block on a Hugging Face decoder.

    alpha: migration strength in [0, 1], ``s = max|x| ** alpha / max|W| ** (1 - alpha)`` per input
        channel (0.5 in the paper; larger moves more of the activation range into the weights).
    scale_dtype, quantize_embeddings: as ``Int8Dynamic``.
    """

    alpha: float = 0.5
    scale_dtype: str = "float32"
    quantize_embeddings: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")
        self.linear_spec()

    @property
    def needs_calib(self) -> bool:
        return True

    def linear_spec(self) -> QuantSpec:
        return weight_spec(8, None, True, self.scale_dtype)

    def embedding_spec(self) -> QuantSpec | None:
        return self.linear_spec() if self.quantize_embeddings else None


@register_config
@dataclass(frozen=True)
class StaticW8A8(QuantConfig):
    """Static W8A8 post-training quantization of Linear and Conv2d layers (depthwise included).

    Weights: int8 symmetric, one scale per output channel. Activations: one scale and zero point per
    tensor for each layer's input and output, fixed by running ``calib`` batches through the float
    model with observers attached (``lowbit.observers``).

    observer: activation observer, "minmax" | "moving_average" | "percentile" | "kl" | "mse". The default,
        "mse", is the best or close to it on every bundled model (``make bench-static``).
    percentile: for observer="percentile", the kept percentile (e.g. 99.99).
    weight_observer: "minmax" (absmax per channel) or "mse" (clipping searched per channel).
    activation_format: "uint8" (asymmetric, ONNX Runtime's default) or "int8" (symmetric).
    fold_bn: fold each BatchNorm2d into the Conv2d before it first (``fold_batchnorm_``).
    fuse_activations: with uint8 activations, a ReLU/ReLU6 right after a layer is absorbed into that
        layer's output range (see ``lowbit.transforms.static``).
    int8_outputs: which layers requantize their output to int8 codes for the next layer: "conv"
        (Conv2d; Linear outputs stay float32, as they feed residual adds, LayerNorm, softmax or logits),
        "all" or "none". Float outputs cost no output observer and no output rounding.
    bias_correction: subtract each layer's expected output shift from weight rounding, ``(W_q - W) E[x]``
        with ``E[x]`` measured on ``calib`` (``lowbit.algorithms.bias_correction``).
    equalize: cross-layer equalization after BatchNorm folding (``lowbit.transforms.equalize.equalize_``):
        consecutive layer pairs in Sequentials get matched per-channel weight ranges. Exact across ReLU;
        a ReLU6 between a pair becomes a ReLU when the layer before absorbs it (``fuse_activations``),
        else that pair is left alone. Off by default: with per-channel weights it has little to fix,
        and on MobileNetV2 (all ReLU6) it lowers top-1 agreement (docs/static_w8a8.md).
    stretch_relu6: before calibration, each ``layer -> ReLU6 -> depthwise conv`` chain gets its quiet
        channels scaled up (the depthwise filter down) toward the top of the ReLU6 range, from the peaks
        one extra pass over ``calib`` measures (``lowbit.transforms.equalize.stretch_relu6_``). Exact in
        float below 1.5x each channel's calibrated peak; no-op for models without such chains.
    weight_bits: 2..8, symmetric per-channel weight codes (``w4a8-static``: 4).
    rounding: how weights round under their scales: "nearest"; "adaround" (learned up/down rounding,
        layer by layer, against the float layer's output) or "brecq" (the same block by block, with
        QDrop's random dropping of activation quantization, ``recon_drop``). Both train on ``calib``
        after calibration and bias correction (``lowbit.transforms.reconstruct``): ``recon_steps``
        Adam steps per unit, on ``recon_device`` (e.g. "cuda"; None: where the model is). A unit whose
        learned rounding fits its calibration data worse than nearest keeps nearest.
    layer_bits: per-layer weight bits (a mixed-precision plan): layer fqn -> 2..8, over ``weight_bits``;
        each name must be a Conv2d/Linear the handler quantizes (checked before the model changes).
    Version 2 added ``equalize``, version 3 ``stretch_relu6``, version 4 ``weight_bits`` and learned
    rounding, version 5 ``layer_bits``; older dicts load with what they ran (``equalize=False``,
    ``stretch_relu6=False``, no per-layer bits).
    """

    VERSION = 5

    observer: str = "mse"
    percentile: float = 99.99
    weight_observer: str = "minmax"
    activation_format: str = "uint8"
    fold_bn: bool = True
    fuse_activations: bool = True
    int8_outputs: str = "conv"
    bias_correction: bool = True
    equalize: bool = False
    stretch_relu6: bool = True
    weight_bits: int = 8
    rounding: str = "nearest"
    recon_steps: int = 500
    recon_drop: float = 0.5
    recon_device: str | None = None
    layer_bits: dict[str, int] = field(default_factory=dict, hash=False)
    version: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.layer_bits, Mapping):
            raise LowbitError(f"layer_bits must map layer names to bits, got {self.layer_bits!r}")
        for fqn, bits in self.layer_bits.items():
            if (
                not isinstance(fqn, str)
                or isinstance(bits, bool)
                or not isinstance(bits, int)
                or not 2 <= bits <= 8
            ):
                raise LowbitError(f"layer_bits[{fqn!r}] must be an integer 2..8, got {bits!r}")
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))
        if self.activation_format not in ("uint8", "int8"):
            raise LowbitError(f"activation_format must be 'uint8' or 'int8', got {self.activation_format!r}")
        if self.int8_outputs not in ("conv", "all", "none"):
            raise LowbitError(f"int8_outputs must be 'conv', 'all' or 'none', got {self.int8_outputs!r}")
        if self.observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {self.observer!r}; known: {', '.join(sorted(OBSERVERS))}")
        if self.weight_observer not in ("minmax", "mse"):
            raise LowbitError(f"weight_observer must be 'minmax' or 'mse', got {self.weight_observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 2 <= self.weight_bits <= 8:
            raise LowbitError(f"weight_bits must be 2..8, got {self.weight_bits}")
        if self.rounding not in ("nearest", "adaround", "brecq"):
            raise LowbitError(f"rounding must be 'nearest', 'adaround' or 'brecq', got {self.rounding!r}")
        if self.recon_steps < 1 or not 0.0 <= self.recon_drop < 1.0:
            raise LowbitError(
                f"recon_steps must be >= 1 and recon_drop in [0, 1), "
                f"got {self.recon_steps}, {self.recon_drop}"
            )

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        return {"stretch_relu6": False, **d} if int(d.get("version", 1)) < 3 else d

    @property
    def needs_calib(self) -> bool:
        return True
