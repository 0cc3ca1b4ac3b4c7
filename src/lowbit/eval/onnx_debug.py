"""Layer-by-layer comparison of a QDQ ONNX model with its float ONNX model, both run in ONNX Runtime.

The counterpart of ``onnxruntime.quantization.qdq_loss_debug`` for lowbit's QDQ exports
(``lowbit.export.onnx``) and other QDQ models. Both models run on ONNX Runtime's CPU provider with graph
optimizations off (no Q/DQ fusion, every tensor observable), from in-memory copies whose compared
tensors are made graph outputs; the files are only read.

Layers and their matching: ``lowbit.eval.onnx_graph``. Pairs whose outputs differ in shape are dropped
and listed as unmatched. Layers are named by their module scope (a lowbit fqn), plus the anchor node's
last name part where a scope holds several layers.

Per pair, summed over all inputs in float64 (``ref`` the float output, ``q`` the QDQ one):
``sqnr_db = 10 log10(sum ref^2 / sum (ref - q)^2)`` (inf when equal), ``rel_error`` =
``sqrt(sum (ref - q)^2 / sum ref^2)``, ``max_abs_error`` = max ``|ref - q|``. Where the QDQ chain holds
a Q/DQ pair with one scale: its scale ``s`` and zero point ``z`` (the first pair, the layer's own output
quantization) and ``outside``, the fraction of ``ref`` values outside ``[(qmin - z) s, (qmax - z) s]``
(qmin/qmax of the zero point's type, or of a Clip between Q and DQ). ``weight_scale``: (min, max) of
the scale of a DequantizeLinear of a constant feeding the anchor.

The float model must compute the same intermediate tensors: equivalence transforms (``equalize``,
``stretch_relu6``) scale channels between layers, and ``float_twin`` drops fused activations (its ReLUs
are Identity), so compare against the float model as it was before those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lowbit.core.errors import LowbitError
from lowbit.eval.onnx_graph import GraphLayer, display_names, graph_layers, match_layers


@dataclass(frozen=True)
class LayerDebug:
    """One matched layer (module docstring). ``module``: its scope fqn ("" for unscoped node names);
    ``float_tensor`` / ``qdq_tensor``: the compared outputs; ``matched_by``: "name", "scope" or "order";
    ``act_scale``, ``act_zero_point``, ``outside`` (a fraction): None where the output stays float."""

    name: str
    module: str
    op: str
    float_tensor: str
    qdq_tensor: str
    matched_by: str
    sqnr_db: float
    rel_error: float
    max_abs_error: float
    act_scale: float | None
    act_zero_point: int | None
    outside: float | None
    weight_scale: tuple[float, float] | None


@dataclass(frozen=True)
class OnnxDebug:
    """All matched layers in the QDQ graph's order, over ``inputs`` feeds; unmatched layers by name."""

    float_path: str
    qdq_path: str
    layers: list[LayerDebug]
    threshold_db: float
    inputs: int
    unmatched_float: list[str]
    unmatched_qdq: list[str]

    def first_below(self, threshold_db: float | None = None) -> LayerDebug | None:
        """The first layer (graph order) whose SQNR is NaN or below ``threshold_db`` (default: the
        result's own), or None."""
        t = self.threshold_db if threshold_db is None else threshold_db
        return next((x for x in self.layers if not x.sqnr_db >= t), None)

    def worst(self, n: int = 10) -> list[LayerDebug]:
        """The ``n`` layers of lowest SQNR, lowest first (NaN first)."""
        return sorted(self.layers, key=lambda x: -math.inf if math.isnan(x.sqnr_db) else x.sqnr_db)[:n]

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers become None."""
        first = self.first_below()
        return {
            "float_path": self.float_path,
            "qdq_path": self.qdq_path,
            "threshold_db": self.threshold_db,
            "inputs": self.inputs,
            "first_below": None if first is None else first.name,
            "layers": [{k: _finite(v) for k, v in asdict(x).items()} for x in self.layers],
            "unmatched_float": list(self.unmatched_float),
            "unmatched_qdq": list(self.unmatched_qdq),
        }


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return list(v) if isinstance(v, tuple) else v


# -- running -----------------------------------------------------------------------------------------


def _load(path):
    """The ``onnx.ModelProto`` at ``path`` (external data read alongside); ``LowbitError`` if none."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"{p}: no such ONNX file")
    try:
        model = onnx.load(str(p))
    except (DecodeError, OSError) as e:
        raise LowbitError(f"{p} is not an ONNX model ({e})") from e
    if not model.graph.node or not model.opset_import:
        raise LowbitError(f"{p} is not an ONNX model (no graph nodes or opset)")
    return model


def _input_specs(model) -> list[tuple[str, np.dtype | None, list[int | None] | None]]:
    """(name, numpy dtype, dims with None for symbolic) of each graph input that is no initializer."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if (
            tt.HasField("shape")) else None  # fmt: skip
        specs.append((vi.name, dtype, dims))
    return specs


def _feed(feed: Mapping, base: list, specs: list, path) -> dict[str, np.ndarray]:
    """``feed`` (keyed by ``base``'s names) checked against one model's ``specs``, renamed by position
    where that model names its inputs otherwise, cast to its dtypes."""
    if [s[0] for s in specs] != [b[0] for b in base] and len(specs) != len(base):
        raise LowbitError(f"{path} takes inputs {[s[0] for s in specs]}, the feed has {sorted(feed)}")
    out = {}
    for (src, _, _), (name, dtype, dims) in zip(base, specs, strict=True):
        x = np.asarray(feed[src])
        if dims is not None and not _fits(dims, x.shape):
            want = ["?" if d is None else d for d in dims]
            raise LowbitError(f"input {src!r} has shape {list(x.shape)}; {path} takes {want}")
        if dtype is not None and x.dtype != dtype:
            if (x.dtype.kind == "f") != (dtype.kind == "f"):
                raise LowbitError(f"input {src!r} is {x.dtype}; {path} takes {dtype}")
            x = x.astype(dtype)
        out[name] = x
    return out


def _fits(dims: list[int | None], shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` has the rank of ``dims`` and their fixed sizes (None or 0: any size)."""
    return len(shape) == len(dims) and all(not d or d == n for d, n in zip(dims, shape, strict=True))


def _feeds(inputs, float_specs, qdq_specs, paths) -> list[tuple[dict, dict]]:
    """(float feed, QDQ feed) per input; the names must be those of one model's inputs."""
    feeds = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not feeds:
        raise LowbitError("compare_onnx needs at least one input feed")
    out = []
    for feed in feeds:
        names = set(feed)
        base = next((s for s in (float_specs, qdq_specs) if names == {x[0] for x in s}), None)
        if base is None:
            fn, qn = [s[0] for s in float_specs], [s[0] for s in qdq_specs]
            raise LowbitError(f"inputs {sorted(names)} match neither {paths[0]} {fn} nor {paths[1]} {qn}")
        out.append((_feed(feed, base, float_specs, paths[0]), _feed(feed, base, qdq_specs, paths[1])))
    return out


def _session(model, outputs: list[str], path):
    """CPU session, graph optimizations off, of the loaded ``model`` with ``outputs`` made graph outputs."""
    import onnx
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(outputs) if t not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise LowbitError(f"ONNX Runtime cannot load {path}: {e}") from e


class _Sums:
    """Running float64 sums of one layer pair over the inputs."""

    def __init__(self, bounds: tuple[float, float] | None) -> None:
        self.bounds, self.signal, self.noise, self.max_abs = bounds, 0.0, 0.0, 0.0
        self.values, self.outside = 0, 0

    def add(self, ref: np.ndarray, q: np.ndarray) -> None:
        ref = ref.astype(np.float64).ravel()
        err = q.astype(np.float64).ravel() - ref
        self.signal += float(ref @ ref)
        self.noise += float(err @ err)
        self.max_abs = max(self.max_abs, float(np.abs(err).max(initial=0.0)))
        self.values += ref.size
        if self.bounds is not None:
            self.outside += int(np.count_nonzero((ref < self.bounds[0]) | (ref > self.bounds[1])))

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    def rel_error(self) -> float:
        if self.signal == 0:
            return 0.0 if self.noise == 0 else math.inf
        return math.sqrt(self.noise / self.signal)


def _accumulate(fm, qm, feeds: list, pairs: list[tuple[GraphLayer, GraphLayer]], paths) -> list[_Sums | None]:
    """Sums per (float, QDQ) layer pair over the feeds; None for a pair whose outputs differ in shape."""
    fnames, qnames = [f.output for f, _ in pairs], [q.output for _, q in pairs]
    fsess, qsess = _session(fm, fnames, paths[0]), _session(qm, qnames, paths[1])
    sums: list[_Sums | None] = [_Sums(_bounds(q.qparams)) for _, q in pairs]
    for ffeed, qfeed in feeds:
        fout = dict(zip(fnames, fsess.run(fnames, ffeed), strict=True))
        qout = dict(zip(qnames, qsess.run(qnames, qfeed), strict=True))
        for k, (f, q) in enumerate(pairs):
            ref, got = fout[f.output], qout[q.output]
            if sums[k] is not None and ref.shape != got.shape:
                sums[k] = None
            elif sums[k] is not None:
                sums[k].add(ref, got)
    return sums


def _bounds(qp: tuple[float, int, int, int] | None) -> tuple[float, float] | None:
    return None if qp is None else ((qp[2] - qp[1]) * qp[0], (qp[3] - qp[1]) * qp[0])


def compare_onnx(
    float_path: str | Path,
    qdq_path: str | Path,
    inputs: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    threshold_db: float = 20.0,
) -> OnnxDebug:
    """Run the float and the QDQ model on ``inputs`` (one feed or a list, keyed by either model's input
    names) and compare them layer by layer (module docstring). ``threshold_db``: ``first_below``'s default.
    Raises ``LowbitError`` for a file that is no ONNX model, inputs that do not fit, or no layer pair."""
    paths = (str(float_path), str(qdq_path))
    fm, qm = _load(float_path), _load(qdq_path)
    feeds = _feeds(inputs, _input_specs(fm), _input_specs(qm), paths)
    flt, qdq = graph_layers(fm.graph), graph_layers(qm.graph)
    pairs = match_layers(flt, qdq)
    if not pairs:
        raise LowbitError(f"no layer of {paths[1]} ({len(qdq)} layers) matches one of {paths[0]} "
                          f"({len(flt)} layers) by tensor name, module scope or order")  # fmt: skip
    sums = _accumulate(fm, qm, feeds, [(flt[j], qdq[i]) for i, (j, _) in pairs.items()], paths)
    pairs = {i: p for (i, p), s in zip(pairs.items(), sums, strict=True) if s is not None}
    if not pairs:
        raise LowbitError(f"the layers matched between {paths[0]} and {paths[1]} all differ in output shape")
    sums = [s for s in sums if s is not None]
    names = display_names(qdq)
    layers = [_result(names[i], qdq[i], flt[j], rule, s)
              for (i, (j, rule)), s in zip(pairs.items(), sums, strict=True)]  # fmt: skip
    used = {j for j, _ in pairs.values()}
    return OnnxDebug(paths[0], paths[1], layers, threshold_db, len(feeds),
                     [n for j, n in enumerate(display_names(flt)) if j not in used],
                     [n for i, n in enumerate(names) if i not in pairs])  # fmt: skip


def _result(name: str, q: GraphLayer, f: GraphLayer, rule: str, s: _Sums) -> LayerDebug:
    qp = q.qparams
    return LayerDebug(
        name=name, module=q.scope, op=q.op, float_tensor=f.output, qdq_tensor=q.output, matched_by=rule,
        sqnr_db=s.sqnr_db(), rel_error=s.rel_error(), max_abs_error=s.max_abs,
        act_scale=None if qp is None else qp[0], act_zero_point=None if qp is None else qp[1],
        outside=None if qp is None else s.outside / max(s.values, 1), weight_scale=q.weight_scale,
    )  # fmt: skip


# -- report ------------------------------------------------------------------------------------------


def _row(mark: str, x: LayerDebug) -> str:
    act = "float" if x.act_scale is None else f"{x.act_scale:.3g}/{x.act_zero_point}"
    outside = "" if x.outside is None else f"{100 * x.outside:.2f}%"
    w = "" if x.weight_scale is None else f"{x.weight_scale[0]:.2g}..{x.weight_scale[1]:.2g}"
    return (f"{mark:2} {x.name[:32]:32} {x.op:9} {x.sqnr_db:8.2f} {x.rel_error:8.4f} {x.max_abs_error:9.4g} "
            f"{act:>14} {outside:>8} {w:>15} {x.matched_by}")  # fmt: skip


def format_debug(result: OnnxDebug, worst: int = 10) -> str:
    """A text report: every layer in graph order (``>>`` marks the first below the threshold), then the
    ``worst`` lowest-SQNR layers, then the unmatched ones."""
    first = result.first_below()
    head = (f"{'':2} {'layer':32} {'op':9} {'SQNR dB':>8} {'rel err':>8} {'max abs':>9} "
            f"{'act scale/zp':>14} {'outside':>8} {'weight scale':>15} matched")  # fmt: skip
    lines = [
        f"{result.qdq_path} vs {result.float_path}: {len(result.layers)} layers, {result.inputs} inputs",
        f"first layer below {result.threshold_db:g} dB: "
        + ("none" if first is None else f"{first.name} ({first.op}, {first.sqnr_db:.2f} dB)"),
        "",
        head,
        *(_row(">>" if x is first else "", x) for x in result.layers),
        "",
        f"worst {worst}:",
        head,
        *(_row(">>" if x is first else "", x) for x in result.worst(worst)),
    ]
    for side, names in (("float", result.unmatched_float), ("QDQ", result.unmatched_qdq)):
        if names:
            lines.append(f"unmatched {side} layers: {', '.join(names)}")
    return "\n".join(lines)
