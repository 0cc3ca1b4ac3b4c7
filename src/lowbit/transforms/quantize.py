"""``quantize_``: look the handler up by ``type(config)`` and let it swap modules in place.

Around every handler, ``quantize_`` itself:

- refuses a model with parameters on the meta device (not loaded) and a bare layer given as the model
  (the model object cannot be swapped in place: wrap it in ``nn.Sequential``), before anything changes;
- keeps layers whose weight has no element out of the handler's selection, listed in
  ``summary.skipped`` ("zero-size weight (0, 8): nothing to quantize");
- lists, after the handler, each selected weight-bearing compute layer it left float (``COMPUTE_LAYERS``:
  Linear, Conv*, RNN/LSTM/GRU and their cells, MultiheadAttention, Bilinear, Embedding(Bag),
  transformers' GPT-2 ``Conv1D``) in ``summary.skipped`` as "Conv1d: not supported by WeightOnly",
  unless the handler gave a reason; a layer inside a listed one (MultiheadAttention's ``out_proj``) is
  covered by its parent. Norms, activations and other leaf modules left float are counted by type in
  ``summary.float_ops``. Layers the user deselected (include/exclude) are not listed.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.kernels.advice import Advice, apply_advice, load_cached
from lowbit.nn.modules import QuantizedModule
from lowbit.transforms.comm import Comm, digest_batches, model_facts
from lowbit.transforms.configs import QuantConfig

HANDLERS: dict[type[QuantConfig], Callable] = {}
DISTRIBUTED: set[type[QuantConfig]] = set()  # handlers that take ``comm=`` (a distributed run)


def register_handler(config_type: type[QuantConfig], distributed: bool = False) -> Callable:
    """Decorator: ``fn(model, config, calib, selector, progress) -> QuantSummary`` handles ``config_type``;
    with ``distributed``, ``fn`` also takes ``comm=`` (``lowbit.transforms.comm.Comm``).

    The handler swaps the selected layers it supports; ``quantize_`` checks the model before and records
    what was left float after (module docstring)."""

    def deco(fn: Callable) -> Callable:
        HANDLERS[config_type] = fn
        if distributed:
            DISTRIBUTED.add(config_type)
        return fn

    return deco


def check_distributed(config: QuantConfig) -> None:
    """``LowbitError`` unless ``config``'s handler runs distributed (``register_handler``)."""
    if type(config) not in DISTRIBUTED:
        raise LowbitError(f"{type(config).__name__} does not run distributed: quantize in one process")


@dataclass
class QuantSummary:
    """What ``quantize_`` did: fqn -> description of quantized modules; fqn -> reason for skipped ones."""

    config: QuantConfig
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    routed: int = 0  # layers given measured backend routes (``advice``)
    folded: dict[str, str] = field(default_factory=dict)  # BatchNorm fqn -> the conv it was folded into
    fused: dict[str, str] = field(default_factory=dict)  # activation fqn -> the layer whose range absorbs it
    equalized: list[tuple[str, str]] = field(default_factory=list)  # (layer, next layer) pairs equalized
    stretched: list[tuple[str, str]] = field(default_factory=list)  # (layer, depthwise conv) across a ReLU6
    float_ops: dict[str, int] = field(default_factory=dict)  # module type -> count of leaf modules left float
    rounded: dict[str, str] = field(
        default_factory=dict
    )  # layer fqn -> its learned rounding (AdaRound/BRECQ)

    def __str__(self) -> str:
        lines = [f"{type(self.config).__name__}: {len(self.quantized)} modules quantized"]
        formats = weight_formats(self.quantized)
        if len(formats) > 1:  # a mixed-precision plan (``WeightOnly.layers``)
            lines.append("  formats: " + ", ".join(f"{k} x{v}" for k, v in formats.most_common()))
        if self.folded:
            lines.append(f"  folded: {len(self.folded)} BatchNorm layers into their convs")
        if self.equalized:
            lines.append(f"  equalized: {len(self.equalized)} consecutive layer pairs (cross-layer)")
        if self.stretched:
            lines.append(f"  stretched: {len(self.stretched)} ReLU6 outputs read by depthwise convs")
        if self.fused:
            lines.append(f"  fused: {len(self.fused)} ReLU/ReLU6 into the output range of the layer before")
        if self.rounded:
            lines.append(
                f"  learned rounding: {len(self.rounded)} layers ({next(iter(self.rounded.values()))}, ...)"
            )
        lines += [f"  tied: {a} shares {b}" for a, b in self.tied.items()]
        lines += [f"  kept float: {k} ({v})" for k, v in self.skipped.items()]
        if self.float_ops:
            ops = ", ".join(f"{k} x{v}" for k, v in self.float_ops.items())
            lines.append(f"  float ops: {ops}; functional ops between layers (adds, attention matmuls) too")
        return "\n".join(lines)


def weight_formats(quantized: dict[str, str]) -> Counter:
    """Weight formats ("uint4 g32 asym") of the layers in ``QuantSummary.quantized``, counted, read
    from their descriptions (``QuantizedWeightModule.extra_repr``: "out x in, format group symmetry,
    scale dtype"); other descriptions are not counted."""
    parts = (d.split(", ") for d in quantized.values())
    return Counter(p[1] for p in parts if len(p) > 1 and re.fullmatch(r"\d+x\d+", p[0]))


class Selector:
    """Module-name filter. Patterns are globs (``*.mlp.*``) or regexes prefixed ``re:``.

    A name is selected when it matches some ``include`` pattern (all names if include is empty)
    and no ``exclude`` pattern, and is not one of the names in ``skip``.
    """

    def __init__(
        self, include: Sequence[str] = (), exclude: Sequence[str] = (), skip: Collection[str] = ()
    ) -> None:
        self.include = [self._compile(p) for p in include]
        self.exclude = [self._compile(p) for p in exclude]
        self.skip = frozenset(skip)

    @staticmethod
    def _compile(p: str) -> re.Pattern:
        try:
            return re.compile(p[3:] if p.startswith("re:") else fnmatch.translate(p))
        except re.error as e:
            raise LowbitError(f"bad module pattern {p!r}: {e}") from None

    def __call__(self, fqn: str) -> bool:
        if fqn in self.skip:
            return False
        inc = not self.include or any(p.fullmatch(fqn) for p in self.include)
        return inc and not any(p.fullmatch(fqn) for p in self.exclude)


# Float layers whose weights carry a layer's compute: each one a config leaves float is listed by name.
COMPUTE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
)  # fmt: skip
COMPUTE_LAYER_NAMES = ("Conv1D",)  # transformers' GPT-2 Conv1D, by name (no transformers import here)


def is_compute_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a float ``COMPUTE_LAYERS`` layer (subclasses too) or a ``COMPUTE_LAYER_NAMES`` one."""
    if isinstance(m, QuantizedModule):
        return False
    return isinstance(m, COMPUTE_LAYERS) or type(m).__name__ in COMPUTE_LAYER_NAMES


def check_model(model: nn.Module) -> None:
    """Raise ``LowbitError`` for a model ``quantize_`` cannot work on in place: parameters on the meta
    device, or a bare layer (the root cannot be swapped for its quantized twin)."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LowbitError(
            f"model has parameters on the meta device (not loaded): {len(meta)} of them, e.g. {meta[0]!r}; "
            "load its weights first (load_state_dict(..., assign=True), or from_pretrained without a meta "
            "device map)"
        )
    if is_compute_layer(model):
        kind = type(model).__name__
        raise LowbitError(
            f"got a bare {kind} as the model: quantize_ swaps layers inside the model in place and cannot "
            f"replace the object it is given; wrap it, model = nn.Sequential(layer), quantize_(model, "
            "config), and use model[0]"
        )


def zero_size_layers(model: nn.Module) -> dict[str, str]:
    """fqn -> reason for each compute layer whose weight has no element (nothing to quantize)."""
    out = {}
    for fqn, m in model.named_modules():
        w = getattr(m, "weight", None)
        if is_compute_layer(m) and isinstance(w, torch.Tensor) and w.numel() == 0:
            out[fqn] = f"zero-size weight {tuple(w.shape)}: nothing to quantize"
    return out


def note_float_layers(model: nn.Module, summary: QuantSummary, select: Callable[[str], bool]) -> None:
    """After a handler: each selected compute layer left float into ``summary.skipped`` (a handler's
    reason kept; layers inside a listed one skipped), leaf modules left float counted in ``float_ops``."""
    config = type(summary.config).__name__
    listed: list[str] = []
    for fqn, m in model.named_modules():
        if any(fqn.startswith(p + ".") for p in listed):
            continue
        if fqn in summary.skipped or (is_compute_layer(m) and select(fqn)):
            listed.append(fqn)
            summary.skipped.setdefault(fqn, f"{type(m).__name__}: not supported by {config}")
    summary.float_ops = float_ops(model)


def float_ops(model: nn.Module) -> dict[str, int]:
    """Leaf module types left float, with counts (``nn.Identity``, left by fusion or folding, not counted)."""
    kinds = Counter(
        type(m).__name__
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, QuantizedModule) and type(m) is not nn.Identity
    )
    return dict(sorted(kinds.items()))


def require_quantized(summary: QuantSummary) -> None:
    """Raise when ``summary`` lists no quantized layer."""
    if not summary.quantized:
        raise LowbitError("no quantizable layer matched (check the model and include/exclude patterns)")


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calib: Iterable | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = False,
    advice: Advice | bool | None = None,
    comm: Comm | None = None,
) -> QuantSummary:
    """Quantize ``model`` in place as ``config`` says; returns what was quantized and what stayed float.

    ``calib``: calibration batches for methods that need them (ignored by round-to-nearest).
    ``include``/``exclude``: module-name patterns (see ``Selector``).
    ``advice``: an ``Advice`` (or True: this machine's cache, from ``lowbit advise``) whose measured
    routes pick each layer's backend by batch size (``lowbit.kernels.advice``).
    ``comm``: the ranks of a distributed run (``lowbit.TorchComm()`` under torchrun), each calling
    ``quantize_`` with the same model, config and ``calib``: they are checked to agree, then share the
    calibration forwards and the rounding; every rank ends with the same quantized model.
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in HANDLERS)
        raise LowbitError(f"no handler for config {type(config).__name__}; known: {known}")
    check_model(model)
    if not hasattr(model, "lowbit_basis"):
        model.lowbit_basis = {}  # a float model: its own basis (lowbit.transforms.basis)
    select = Selector(include, exclude)
    empty = {f: why for f, why in zero_size_layers(model).items() if select(f)}
    select = Selector(include, exclude, skip=empty)
    if comm is not None and comm.world > 1:
        check_distributed(config)
        calib = None if calib is None else list(calib)
        facts = {"config": config.to_dict(), "include": list(include), "exclude": list(exclude)}
        facts |= {"model": model_facts(model), "calib": None if calib is None else digest_batches(calib)}
        comm.agree(facts)
        summary = handler(model, config, calib, select, progress, comm=comm)
    else:
        summary = handler(model, config, calib, select, progress)
    summary.skipped.update(empty)
    note_float_layers(model, summary, select)
    require_quantized(summary)
    if advice:
        summary.routed = apply_advice(model, load_cached() if advice is True else advice)
    model.lowbit_config = config.to_dict()
    return summary
