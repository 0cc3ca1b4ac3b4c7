"""Layers of an ONNX graph, and their pairing between a float model and its QDQ model
(``lowbit.eval.onnx_debug`` compares the pairs).

Layers. A layer starts at an anchor node: Conv, ConvTranspose, Gemm, MatMul, an Add of two computed
tensors, or a BatchNormalization / activation that no layer before took in. While its tensor has one
consumer it takes in what a quantizer fuses into it: BatchNormalization and activations (``FUSED``),
the bias Add of a MatMul, and QuantizeLinear -> [Clip] -> DequantizeLinear pairs. The layer's output is
the chain's last tensor: a float ``Conv -> BatchNormalization -> Relu`` compares with a QDQ
``Conv -> QuantizeLinear -> DequantizeLinear`` whose BatchNorm was folded and ReLU absorbed. A layer's
output qparams are those of the first Q/DQ pair on its chain (its own output quantization) when that
pair has one constant scale; its weight scale is that of a DequantizeLinear of a constant feeding the
anchor.

Matching (``match_layers``), in this order; a pairing is one to one and of the same anchor op type:

| rule  | a QDQ layer and a float layer pair when                                                          |
|-------|--------------------------------------------------------------------------------------------------|
| name  | their chains share a tensor name (a QDQ rewrite keeps the float tensor's name on its DQ output)   |
| scope | the module scopes of their anchor names (TorchScript exporter: ``/features/features.0/Conv`` ->  |
|       | ``features.0``; lowbit's wrapper ``model`` dropped where it prefixes every scope of a graph) are |
|       | equal, or one is a dotted suffix of the other, and so is the op's occurrence within the scope     |
| order | the layers of an op type left unpaired are as many on both sides: paired in graph order           |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # plus Add of two computed tensors
FUSED = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid",
         "Tanh", "Gelu")  # fmt: skip
WRAPPER = "model"  # lowbit's exporter wraps the model as ``model`` (lowbit.export.onnx)


@dataclass
class GraphLayer:
    """One layer of one graph: anchor node, scope, tensors along its chain (the last is its output),
    output qparams (scale, zero point, qmin, qmax) and weight scale range."""

    op: str
    node: str
    scope: str
    tensors: list[str]
    qparams: tuple[float, int, int, int] | None
    weight_scale: tuple[float, float] | None
    occurrence: int = 0

    @property
    def output(self) -> str:
        return self.tensors[-1]


class _Graph:
    """Read-only index of an ONNX graph: consumers and producers of tensors, constant values, and the
    tensors computed from constants alone."""

    def __init__(self, graph) -> None:
        self.nodes = list(graph.node)
        self.outputs = {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer}
        self.users: dict[str, list[int]] = {}
        self.producer: dict[str, int] = {}
        self.const = set(self.inits) | {""}
        for i, n in enumerate(self.nodes):
            for x in n.input:
                self.users.setdefault(x, []).append(i)
            self.producer.update((y, i) for y in n.output)
            if n.op_type == "Constant" or (n.input and all(x in self.const for x in n.input)):
                self.const.update(n.output)

    def value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        from onnx import helper, numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.nodes[self.producer[name]] if name in self.producer else None
        if node is None or node.op_type != "Constant":
            return None
        attr = next((a for a in node.attribute if a.name == "value"), None)
        return None if attr is None else numpy_helper.to_array(helper.get_attribute_value(attr))


def graph_layers(graph) -> list[GraphLayer]:
    """The layers of an ONNX ``GraphProto`` in node order (module docstring), scopes with the wrapper
    dropped, numbered by occurrence of their op within their scope."""
    g = _Graph(graph)
    taken: set[int] = set()
    layers = []
    for i, node in enumerate(g.nodes):
        if i in taken or not _is_anchor(g, node):
            continue
        chain, tensors, pair = _chain(g, i)
        taken.update(chain)
        layers.append(GraphLayer(node.op_type, node.name, _scope(node.name), tensors, _qparams(g, pair),
                             _weight_scale(g, node)))  # fmt: skip
    scoped = [x for x in layers if x.scope]
    if scoped and all(f"{x.scope}.".startswith(WRAPPER + ".") for x in scoped):
        for x in scoped:
            x.scope = x.scope[len(WRAPPER) + 1 :]
    seen: dict[tuple[str, str], int] = {}
    for x in layers:
        x.occurrence = seen.get((x.scope, x.op), 0)
        seen[(x.scope, x.op)] = x.occurrence + 1
    return layers


def _is_anchor(g: _Graph, node) -> bool:
    computed = [x for x in node.input if x not in g.const]
    if node.op_type in ANCHORS:
        return bool(computed)
    if node.op_type == "Add":
        return len(computed) >= 2
    if node.op_type not in FUSED or not computed:
        return False
    src = g.producer.get(node.input[0])
    return src is None or g.nodes[src].op_type != "QuantizeLinear"  # a Clip of codes is no layer


def _chain(g: _Graph, start: int) -> tuple[list[int], list[str], tuple[int, int | None, int] | None]:
    """Node indices of the layer anchored at ``start``, the tensors it passes (last: its output), and its
    first Q/DQ pair as node indices (Q, Clip or None, DQ)."""
    taken, pair = [start], None
    tensors = [g.nodes[start].output[0]]
    while tensors[-1] not in g.outputs and len(g.users.get(tensors[-1], ())) == 1:
        i = g.users[tensors[-1]][0]
        node = g.nodes[i]
        step = _qdq_pair(g, i) if node.op_type == "QuantizeLinear" else None
        if step is not None:
            pair = pair or step
            nodes = [j for j in step if j is not None]
        elif node.op_type in FUSED or _is_bias_add(g, node, g.nodes[taken[-1]]):
            nodes = [i]
        else:
            break
        taken += nodes
        tensors.append(g.nodes[nodes[-1]].output[0])
    return taken, tensors, pair


def _qdq_pair(g: _Graph, q: int) -> tuple[int, int | None, int] | None:
    users = g.users.get(g.nodes[q].output[0], [])
    if len(users) != 1:
        return None
    nxt = g.nodes[users[0]]
    if nxt.op_type == "DequantizeLinear":
        return q, None, users[0]
    after = g.users.get(nxt.output[0], [])
    if nxt.op_type == "Clip" and len(after) == 1 and g.nodes[after[0]].op_type == "DequantizeLinear":
        return q, users[0], after[0]
    return None


def _is_bias_add(g: _Graph, node, prev) -> bool:
    return node.op_type == "Add" and prev.op_type == "MatMul" and sum(x in g.const for x in node.input) == 1


def _qparams(g: _Graph, pair) -> tuple[float, int, int, int] | None:
    """(scale, zero point, qmin, qmax) of a Q/DQ pair with one constant scale, else None."""
    if pair is None:
        return None
    q = g.nodes[pair[0]]
    scale = g.value(q.input[1])
    zp = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1 or zp.dtype.kind not in "iu":
        return None
    lo, hi = int(np.iinfo(zp.dtype).min), int(np.iinfo(zp.dtype).max)
    if pair[1] is not None:
        clip = g.nodes[pair[1]]
        bounds = [g.value(x) if x else None for x in list(clip.input[1:3]) + ["", ""]][:2]
        lo = lo if bounds[0] is None else int(bounds[0])
        hi = hi if bounds[1] is None else int(bounds[1])
    return float(scale.reshape(())), int(zp.reshape(())), lo, hi


def _weight_scale(g: _Graph, node) -> tuple[float, float] | None:
    """(min, max) scale of a DequantizeLinear of a constant that feeds ``node`` (a weight), else None."""
    if node.op_type not in ANCHORS:
        return None
    for x in node.input:
        src = g.nodes[g.producer[x]] if x in g.producer else None
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in g.const:
            s = g.value(src.input[1])
            if s is not None and s.size:
                return float(s.min()), float(s.max())
    return None


def _scope(node_name: str) -> str:
    """Module fqn of a TorchScript-exported node name, "" without scopes: "/model/model.1/conv/conv.2/Conv"
    -> "model.1.conv.2" (an index part repeats its parent's name), "/features/features.0/Conv" ->
    "features.0"."""
    parts = node_name.split("/")[1:-1] if node_name.startswith("/") else []
    out, prev = [], ""
    for p in parts:
        out.append(p[len(prev) + 1 :] if p.startswith(prev + ".") else p)
        prev = p
    return ".".join(out)


def match_layers(flt: list[GraphLayer], qdq: list[GraphLayer]) -> dict[int, tuple[int, str]]:
    """{QDQ layer index: (float layer index, rule)} by the rules of the module docstring."""
    pairs: dict[int, tuple[int, str]] = {}
    by_tensor = {t: j for j, x in enumerate(flt) for t in x.tensors}
    rules = {
        "name": lambda q, f, j: j in {by_tensor.get(t) for t in q.tensors},
        "scope": lambda q, f, j: bool(q.scope) and q.scope == f.scope and q.occurrence == f.occurrence,
        "suffix": lambda q, f, j: bool(q.scope and f.scope) and q.occurrence == f.occurrence
        and (f".{q.scope}".endswith(f".{f.scope}") or f".{f.scope}".endswith(f".{q.scope}")),
    }  # fmt: skip
    for rule, fits in rules.items():
        for i, q in enumerate(qdq):
            if i in pairs:
                continue
            taken = {j for j, _ in pairs.values()}
            cands = [j for j, f in enumerate(flt) if j not in taken and f.op == q.op and fits(q, f, j)]
            if len(cands) == 1:
                pairs[i] = (cands[0], "scope" if rule == "suffix" else rule)
    taken = {j for j, _ in pairs.values()}
    for op in dict.fromkeys(x.op for x in qdq):
        qs = [i for i, x in enumerate(qdq) if x.op == op and i not in pairs]
        fs = [j for j, x in enumerate(flt) if x.op == op and j not in taken]
        if qs and len(qs) == len(fs):
            pairs.update((i, (j, "order")) for i, j in zip(qs, fs, strict=True))
    return dict(sorted(pairs.items()))


def display_names(layers: list[GraphLayer]) -> list[str]:
    """Scope fqn, with the anchor node's last name part where the scope holds several layers; else the
    node name, else the output tensor."""
    count: dict[str, int] = {}
    for x in layers:
        count[x.scope] = count.get(x.scope, 0) + 1
    names = []
    for x in layers:
        if x.scope and count[x.scope] == 1:
            names.append(x.scope)
        elif x.scope:
            names.append(f"{x.scope}/{x.node.rsplit('/', 1)[-1]}")
        else:
            names.append(x.node or x.output)
    return names
