"""Energy estimate: exact operation and byte counts on small layers, quantized layers cheaper than float."""

import copy

import pytest
import torch
from tests.support import tiny_llama
from torch import nn

import lowbit
from lowbit.core.errors import LowbitError
from lowbit.eval import energy
from lowbit.eval.energy import HOROWITZ_45NM, count_operations, measured_energy_uj


def test_linear_counts_are_exact():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    est = count_operations(model, torch.randn(3, 8), samples=3)
    first, second = est.layers
    assert (first.name, first.kind, first.macs) == ("0", "fp32", 3 * 8 * 4)
    assert first.weight_bytes == (8 * 4 + 4) * 4
    assert first.activation_bytes == (3 * 8 + 3 * 4) * 4
    assert (second.macs, second.weight_bytes) == (3 * 4 * 2, 4 * 2 * 4)
    assert est.macs() == {"fp32": (96 + 24) // 3}
    assert est.compute_uj() == pytest.approx(HOROWITZ_45NM["mac_fp32"] * 40 / 1e6)
    assert est.weights_uj() == pytest.approx(HOROWITZ_45NM["dram_byte"] * (144 + 32) / 1e6)
    act = (first.activation_bytes + second.activation_bytes) / 3
    assert est.activations_uj() == pytest.approx(HOROWITZ_45NM["sram_byte"] * act / 1e6)
    assert est.total_uj() == pytest.approx(est.compute_uj() + est.weights_uj() + est.activations_uj())


def test_conv_macs_count_groups_and_kernel():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise: 9 MACs per output element
    est = count_operations(conv, torch.randn(2, 4, 5, 5))
    assert est.layers[0].macs == 2 * 4 * 5 * 5 * 9


def test_weight_only_quantization_moves_fewer_bytes_same_macs():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 16))
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.WeightOnly(bits=4, group_size=32), exclude=["lm_head", "model.embed_tokens"])
    fwd = lambda m, b: m(input_ids=b)  # noqa: E731
    ref, quant = count_operations(model, ids, fwd), count_operations(q, ids, fwd)
    assert quant.macs() == ref.macs()  # weight-only: the same float32 arithmetic
    ref_w = sum(x.weight_bytes for x in ref.layers if x.name != "lm_head")
    q_w = sum(x.weight_bytes for x in quant.layers if x.name != "lm_head")
    assert q_w < ref_w / 4  # 4-bit codes plus group scales and zero points against float32
    assert quant.weights_uj() < ref.weights_uj() / 4
    assert quant.to_dict()["total_uj"] < ref.to_dict()["total_uj"]


def test_static_w8a8_counts_int8_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    q = copy.deepcopy(model)
    lowbit.quantize_(q, lowbit.StaticW8A8(), calib)
    x = torch.randn(2, 3, 8, 8)
    ref, quant = count_operations(model, x, samples=2), count_operations(q, x, samples=2)
    assert set(quant.macs()) == {"int8"} and quant.macs()["int8"] == ref.macs()["fp32"]
    assert quant.compute_uj() < ref.compute_uj() / 10  # 0.3 pJ against 4.6 pJ per MAC
    conv = next(x for x in quant.layers if x.name == "0")
    assert conv.activation_bytes == 2 * (3 * 8 * 8 + 8 * 6 * 6)  # int8 codes in and out


def test_model_without_layers_is_refused():
    with pytest.raises(LowbitError, match="no Linear or Conv2d layer ran"):
        count_operations(nn.ReLU(), torch.randn(2, 3))


def test_rapl_absent_gives_none_and_present_gives_the_median(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL", tmp_path / "missing")
    assert measured_energy_uj(lambda: None) is None
    counter = tmp_path / "energy_uj"
    counter.write_text("1000")
    monkeypatch.setattr(energy, "RAPL", counter)
    steps = iter([500, 700, 600])

    def run():
        counter.write_text(str(int(counter.read_text()) + next(steps)))

    got = measured_energy_uj(run, repeats=3)
    assert got["package_uj"] == 600 and got["counter"] == str(counter)
