"""Kernels as custom ops (``lowbit.kernels.ops``): ``torch.compile(fullgraph=True)`` (which raises at any
graph break) keeps quantized models in one graph and gives eager's outputs, with every backend, after
deep copies, with two models alive and after buffers change. Eager forwards do not go through the ops."""

import copy
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import QEmbedding, QLinear, QuantSpec
from lowbit.algorithms import rtn
from lowbit.core.spec import PerGroup
from lowbit.kernels import backends, dispatch, ops

pytestmark = pytest.mark.skipif(not ops.AVAILABLE, reason="torch without opaque objects: no custom ops")

CPU = torch.device("cpu")
# a config each weight-only backend can run (rows % 16 == 0 and groups of 32 for cpu_int4pack)
WEIGHT_ONLY = {
    "cpu_int8pack": lowbit.WeightOnly(bits=8, group_size=None, symmetric=True),
    "cpu_int4pack": lowbit.WeightOnly(bits=4, group_size=32),
}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def _quantized(config, seed: int = 0) -> nn.Module:
    model = _mlp(seed)
    lowbit.quantize_(model, config)
    return model


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, (3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=4),  # 3x8 out
        nn.Flatten(),
        nn.Linear(16 * 3 * 8, 10),
    ).eval()


def _force(model: nn.Module, backend: str) -> nn.Module:
    """``model`` with every quantized Linear forced to ``backend`` (skips if it cannot run one here)."""
    for m in model.modules():
        if isinstance(m, QLinear):
            if not next(b for b in backends(m.KERNEL_OP) if b.name == backend).supports(m, CPU):
                pytest.skip(f"{backend} cannot run {m} here")
            m.backend = backend
    return model


def _compiled(model: nn.Module, *xs: torch.Tensor, **options) -> list[torch.Tensor]:
    """Outputs of ``torch.compile(model, fullgraph=True)`` for each input, with a fresh Dynamo cache."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, **options)
    with torch.no_grad():
        return [compiled(x) for x in xs]


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("backend", [b.name for b in backends("weight_only_linear")])
def test_compiled_weight_only_equals_eager(backend):
    model = _mlp()
    lowbit.quantize_(model, WEIGHT_ONLY.get(backend, lowbit.WeightOnly(bits=4, group_size=32)))
    _force(model, backend)
    x = torch.randn(2, 3, 64)
    (y,) = _compiled(model, x)
    assert torch.equal(y, _eager(model, x))


@pytest.mark.parametrize("backend", [b.name for b in backends("dynamic_linear")])
def test_compiled_dynamic_equals_eager(backend):
    model = _force(_quantized(lowbit.Int8Dynamic()), backend)
    x = torch.randn(3, 64)
    (y,) = _compiled(model, x)
    assert torch.equal(y, _eager(model, x))


@pytest.mark.parametrize("int8_outputs", ["none", "all"])
def test_compiled_static_equals_eager(int8_outputs):
    """QStaticConv2d and QStaticLinear, with float32 outputs (MatMulIntegerToFloat) and requantized ones."""
    model = _cnn()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    lowbit.quantize_(model, lowbit.StaticW8A8(observer="minmax", int8_outputs=int8_outputs), calib)
    x = torch.randn(2, 3, 8, 8)
    (y,) = _compiled(model, x)
    assert torch.equal(y, _eager(model, x))


def test_compiled_with_dynamic_shapes_equals_eager():
    model = _quantized(lowbit.WeightOnly(bits=4, group_size=32))
    xs = [torch.randn(n, 64) for n in (1, 5, 2)]
    for y, x in zip(_compiled(model, *xs, dynamic=True), xs, strict=True):
        assert torch.equal(y, _eager(model, x))


def test_compiled_in_grad_mode_equals_eager_without_warnings():
    """An input that requires grad: the ops' Autograd falls through, so compiling does not warn about a
    missing autograd kernel, and outputs match eager's."""
    model = _quantized(lowbit.WeightOnly(bits=4, group_size=32))
    x = torch.randn(3, 64, requires_grad=True)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel")
        y = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(y, model(x))


def test_compiled_llama_equals_eager():
    """Embedding, LM head (tied to it) and every Linear quantized; inductor fuses the float ops around the
    kernels (RMSNorm, softmax) in its own order, hence a tolerance (measured 4.2e-7)."""
    from support import tiny_llama

    model = tiny_llama(vocab=256, hidden=64, intermediate=128)
    lowbit.quantize_(model, lowbit.WeightOnly(bits=4, group_size=32))
    assert isinstance(model.model.embed_tokens, QEmbedding)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        y = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)


def test_copies_and_two_models_each_run_their_own_layers():
    """A deep copy's compiled graph runs the copy's layers, not the original's; both stay correct as
    their buffers are loaded (in place) or replaced (new tensors), with both compiled models alive."""
    model = _quantized(lowbit.WeightOnly(bits=4, group_size=32))
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    a, b = torch.compile(model, fullgraph=True), torch.compile(twin, fullgraph=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        twin.load_state_dict(_quantized(lowbit.WeightOnly(bits=4, group_size=32), seed=1).state_dict())
        layer = model[2]
        layer.set_weight(rtn(torch.randn(32, 128), layer.spec))  # new qweight/scale tensors
        ya, yb = a(x), b(x)
        assert torch.equal(ya, model(x)) and torch.equal(yb, twin(x))
        assert not torch.equal(ya, yb)


def test_each_module_and_copy_holds_its_own_reference():
    layer = QLinear(64, 16, QuantSpec("uint4", False, PerGroup(32), "float16"))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.copy(layer), copy.deepcopy(layer), torch.load(buffer, weights_only=False)]
    for m in [layer, *copies]:
        assert getattr(m, ops.REF_ATTR).layer() is m
    with pytest.raises(TypeError, match="not saved"):
        pickle.dumps(getattr(layer, ops.REF_ATTR))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.namespace)
        return func(*args, **(kwargs or {}))


def test_eager_forward_does_not_go_through_the_ops():
    model = _quantized(lowbit.WeightOnly(bits=4, group_size=32))
    with torch.no_grad(), _OpLog() as log:
        model(torch.randn(2, 64))
        ops.call("weight_only_linear", model[0], torch.randn(2, 64))
    assert log.ops.count("lowbit") == 1  # the explicit call only


def _layer_inputs():
    """(op, layer, input) for each op, on the reference backends."""
    wo = _quantized(lowbit.WeightOnly(bits=4, group_size=32))[0]
    dyn = _quantized(lowbit.Int8Dynamic())[0]
    static = _cnn()
    calib = [torch.randn(4, 3, 8, 8)]
    lowbit.quantize_(static, lowbit.StaticW8A8(observer="minmax", int8_outputs="all"), calib)
    emb = QEmbedding(50, 32, QuantSpec("int8", True, PerGroup(16), "float32"))
    for m in (wo, dyn, static[2], static[4]):
        m.backend = "reference"
    return [
        ("weight_only_linear", wo, torch.randn(2, 3, 64)),
        ("dynamic_linear", dyn, torch.randn(3, 64)),
        ("static_conv2d", static[2], torch.randn(2, 16, 8, 8)),
        ("static_linear", static[4], torch.randn(2, 384)),
        ("embedding", emb, torch.randint(0, 50, (2, 5))),
    ]


def test_ops_pass_opcheck():
    """Schema, fake implementation (shapes, dtypes, devices against the real one) and AOT dispatch."""
    for op, layer, x in _layer_inputs():
        size = ops.OPS[op][0](x, layer)
        args = (x, getattr(layer, ops.REF_ATTR), size)
        torch.library.opcheck(getattr(torch.ops.lowbit, op).default, args)
        assert torch.equal(ops.call(op, layer, x), dispatch(op, layer, x, "reference")(x, layer))


# modules made unimportable -> whether the ops are defined
BLOCKED = {
    "no-inductor": ("'torch._inductor': None, 'torch._dynamo': None", True),
    "no-opaque-objects": ("'torch._library.opaque_object': None", False),  # older torch
}


@pytest.mark.parametrize("blocked,defined", BLOCKED.values(), ids=BLOCKED.keys())
def test_import_without_inductor_or_opaque_objects(blocked, defined):
    """lowbit imports and runs eager forwards (and ``call``) without Dynamo and inductor, or without
    opaque objects (then no op is defined)."""
    code = (
        f"import sys, torch; sys.modules.update({{{blocked}}}); "
        "import lowbit; from lowbit.kernels import ops; from torch import nn; "
        f"assert ops.AVAILABLE is hasattr(torch.ops.lowbit, 'weight_only_linear') is {defined}; "
        "m = nn.Sequential(nn.Linear(64, 16)); lowbit.quantize_(m, lowbit.WeightOnly(group_size=32)); "
        "x = torch.randn(2, 64); assert torch.equal(m(x), ops.call('weight_only_linear', m[0], x))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
