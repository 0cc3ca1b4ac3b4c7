"""Block-wise QAT of a decoder (``WeightOnly(method="qat")``, ``lowbit.transforms.block_train``): training
lowers the block output error below AWQ+GPTQ's, the result saves and reloads, a NaN loss names the block,
streaming resumes without retraining finished blocks, and bad options are refused."""

import copy
import json
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit import LowbitError, WeightOnly, quantize_
from lowbit.export import streaming
from lowbit.export.streaming import quantize_folder
from lowbit.transforms import block, block_train, sequential
from lowbit.transforms.block import BlockPlan, quantize_block
from lowbit.transforms.block_train import Training
from lowbit.transforms.comm import Comm
from lowbit.transforms.mappings import architecture
from support import tiny_llama

QAT = WeightOnly(bits=3, group_size=16, method="qat", train_epochs=4, train_batch=2)


def _calib(seed=1, n=6, length=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (1, length), generator=g) for _ in range(n)]


def _block_error(train: Training | None, model=None) -> tuple[float, dict, torch.nn.Module]:
    """Block 0 of the tiny Llama, rounded w3g16 by AWQ+GPTQ (then trained with ``train``): the mean
    squared error of its output against the float block on the calibration inputs, and what it did."""
    model = model or tiny_llama()
    cap = sequential.capture(model, "model.layers", _calib())
    b = copy.deepcopy(model.model.layers[0])
    want = [b(h, **kw) for h, kw in zip(cap.hidden, cap.kwargs[0], strict=True)]
    plan = BlockPlan(QAT.linear_spec(), scales="awq", rounding="gptq", train=train)
    arch = architecture(model.config)
    res = quantize_block(b, "model.layers.0", plan, arch, lambda n: True, cap.hidden, cap.kwargs[0], False)
    with torch.no_grad():
        got = [b(h, **kw) for h, kw in zip(cap.hidden, cap.kwargs[0], strict=True)]
        err = sum(float((g - w).pow(2).sum()) for g, w in zip(got, want, strict=True))
    return err / sum(w.numel() for w in want), res.trained, b


def test_training_lowers_the_block_output_error():
    base, trained, _ = _block_error(None)
    assert trained == {}
    err, trained, b = _block_error(Training(epochs=4, batch=2))
    assert err < 0.95 * base  # measured: 5.30e-07 -> 4.69e-07 (x0.886)
    assert "block output mse" in trained["model.layers.0"] and "kept" not in trained["model.layers.0"]
    assert sum(type(m).__name__ == "QLinear" for m in b.modules()) == 7


def test_no_gain_keeps_the_initial_rounding():
    """Learning rates too small to move anything: the AWQ+GPTQ codes are kept, bit for bit."""
    base_err, _, base = _block_error(None)
    err, trained, b = _block_error(Training(epochs=1, lr=1e-12, qparam_lr=1e-12))
    assert "kept the initial rounding" in trained["model.layers.0"] and err == base_err
    for (n, q), (_, r) in zip(base.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(q, r), n


def test_saved_model_reloads_with_the_same_logits(tmp_path):
    model = tiny_llama()
    summary = quantize_(model, QAT, _calib(), exclude=("lm_head", "model.embed_tokens"))
    assert len(summary.quantized) == 14 and set(summary.trained) == {"model.layers.0", "model.layers.1"}
    assert "trained model.layers.0: block output mse" in str(summary)
    lowbit.save(model, tmp_path / "q")
    again = lowbit.load(tmp_path / "q")
    assert again.lowbit_config["method"] == "qat" and again.lowbit_config["train_epochs"] == 4
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_a_nan_loss_names_the_block(monkeypatch):
    real = block_train._Loss.__call__
    monkeypatch.setattr(block_train._Loss, "__call__", lambda self, items: real(self, items) * float("nan"))
    with pytest.raises(LowbitError, match=r"model.layers.0: training loss is nan at epoch 1, step 1"):
        quantize_(tiny_llama(), QAT, _calib(), progress=False)


def test_distributed_is_refused():
    class Two(Comm):
        world = 2

    model = tiny_llama()
    cap = sequential.capture(model, "model.layers", _calib())
    plan = BlockPlan(QAT.linear_spec(), scales="awq", rounding="gptq", train=Training())
    with pytest.raises(LowbitError, match="does not run distributed"):
        quantize_block(model.model.layers[0], "model.layers.0", plan, architecture(model.config),
                       lambda n: True, cap.hidden, cap.kwargs[0], comm=Two())  # fmt: skip


@pytest.fixture
def src(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("target", ["block", "model"])
def test_streaming_equals_in_memory_and_resumes_without_retraining(src, tmp_path, monkeypatch, target):
    """Bitwise the in-memory result; a crash in block 1 resumes there (with ``target="model"`` the float
    model's activations are staged with the quantized ones)."""
    config = replace(QAT, train_epochs=2, train_target=target)
    model = tiny_llama()
    quantize_(model, config, _calib())
    lowbit.save(model, tmp_path / "mem")
    quantize_folder(src, config, tmp_path / "whole", _calib(), progress=False)
    mem, whole = (tmp_path / d / "model.safetensors" for d in ("mem", "whole"))
    assert mem.read_bytes() == whole.read_bytes()

    trained, real_train = [], block.train_block

    def counting(b, swaps, hidden, kwargs, targets, options, name, *args):
        trained.append(name)
        if name.endswith(".1") and len(trained) == 2:
            raise RuntimeError("simulated crash")
        return real_train(b, swaps, hidden, kwargs, targets, options, name, *args)

    monkeypatch.setattr(block, "train_block", counting)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_folder(src, config, tmp_path / "out", _calib(), progress=False)
    stage = tmp_path / f".out{streaming.STAGE_SUFFIX}"
    assert json.loads((stage / "state.json").read_text())["done"] == 1
    summary = quantize_folder(src, config, tmp_path / "out", _calib(), progress=False)
    assert trained == ["model.layers.0", "model.layers.1", "model.layers.1"]  # block 0 came from staging
    assert set(summary.trained) == {"model.layers.0", "model.layers.1"}  # its record too
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == whole.read_bytes()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"train_epochs": 0}, "train_epochs must be a positive integer"),
        ({"train_batch": True}, "train_batch must be a positive integer"),
        ({"train_lr": 0.0}, "train_lr must be a learning rate in"),
        ({"train_qparam_lr": 2.0}, "train_qparam_lr must be a learning rate in"),
        ({"train_lr": "fast"}, "train_lr must be a learning rate in"),
        ({"train_target": "teacher"}, "train_target must be 'block' or 'model'"),
    ],
    ids=["epochs", "batch", "lr", "qparam-lr", "lr-type", "target"],
)
def test_bad_options(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        WeightOnly(method="qat", **kwargs)


def test_needs_calibration_data():
    assert QAT.needs_calib
    with pytest.raises(LowbitError, match="method 'qat' needs calibration data"):
        quantize_(tiny_llama(), QAT)
