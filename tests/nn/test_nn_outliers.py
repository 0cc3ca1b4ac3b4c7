"""QLinearOutlier: float outlier columns + W8A8 dynamic rest, against the float Linear and QDynamicLinear."""

import json

import pytest
import torch
from torch import nn

from lowbit.algorithms import rtn
from lowbit.core import LowbitError
from lowbit.export.checkpoint import load, save
from lowbit.kernels.reference import dynamic_linear
from lowbit.nn import QMODULES, WEIGHT_SPEC, QDynamicLinear
from lowbit.nn.outliers import QLinearOutlier

OUTLIERS = torch.tensor([200, 3, 100])  # any order; stored sorted
BACKENDS = ["reference", None]  # None: normal selection (lowbit's native W8A8 kernel where it builds)


def _layer_and_input(bias=True, outlier_scale=100.0):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=bias)
    x = torch.randn(4, 16, 256)
    x[..., OUTLIERS] *= outlier_scale
    return lin, x


def _rel_rms(y, ref):
    return float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_close_to_float_linear(backend):
    lin, x = _layer_and_input(outlier_scale=1.0)
    q = QLinearOutlier.from_float(lin, OUTLIERS, backend=backend)
    with torch.no_grad():
        # measured relative RMS error: 7.6e-3 (reference and cpu_native)
        assert _rel_rms(q(x), lin(x)) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_outliers_beat_plain_w8a8(backend):
    lin, x = _layer_and_input()
    q = QLinearOutlier.from_float(lin, OUTLIERS, backend=backend)
    plain = QDynamicLinear.from_float(lin, WEIGHT_SPEC)
    plain.set_weight(rtn(lin.weight.detach(), WEIGHT_SPEC))
    plain.bias, plain.backend = lin.bias.detach().clone(), backend
    with torch.no_grad():
        ref = lin(x)
        err_split, err_plain = _rel_rms(q(x), ref), _rel_rms(plain(x), ref)
    # measured relative RMS: split 7.1e-4, plain 2.1e-2 -> ratio 30 (reference and cpu_native)
    assert err_plain / err_split > 10


def test_forward_is_w8a8_rest_plus_float_outliers():
    lin, x = _layer_and_input()
    q = QLinearOutlier.from_float(lin, OUTLIERS, backend="reference")
    assert q.outlier_idx.tolist() == [3, 100, 200] and q.rest_idx.numel() == 253
    assert (q.rows, q.cols, q.n_outliers) == (64, 253, 3)
    w = lin.weight.detach()
    expected = dynamic_linear(x[..., q.rest_idx], q) + x[..., q.outlier_idx] @ w[:, q.outlier_idx].T
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
    full = q.dequantized_weight()
    assert full.shape == (64, 256)
    torch.testing.assert_close(full[:, q.outlier_idx], w[:, q.outlier_idx], rtol=0, atol=0)
    torch.testing.assert_close(full, w, rtol=0, atol=float(q.scale.max()) / 2 + 1e-7)


def test_float16_outliers_no_bias_and_none_at_all():
    lin, x = _layer_and_input(bias=False)
    q = QLinearOutlier.from_float(lin, OUTLIERS, outlier_dtype=torch.float16)
    assert q.outlier_weight.dtype == torch.float16 and q.bias is None
    assert "3 outlier columns in float16" in repr(q)
    with torch.no_grad():
        y = q(x)
        # measured relative RMS: 7.0e-4 (fp16 outlier columns), 2.1e-2 (no outliers: plain W8A8)
        assert y.dtype == torch.float32 and _rel_rms(y, lin(x)) < 2e-3
        q0 = QLinearOutlier.from_float(lin, torch.tensor([], dtype=torch.int64))
        assert q0.outlier_weight.shape == (64, 0) and _rel_rms(q0(x), lin(x)) < 0.1


def test_config_entry_round_trip():
    lin, x = _layer_and_input()
    q = QLinearOutlier.from_float(lin, OUTLIERS, outlier_dtype=torch.float16)
    entry = json.loads(json.dumps(q.config_entry()))
    assert entry["type"] == "QLinearOutlier" and QMODULES["QLinearOutlier"] is QLinearOutlier
    assert entry["n_outliers"] == 3 and entry["outlier_dtype"] == "float16"
    q2 = QLinearOutlier.from_entry(entry)
    assert {k: v.shape for k, v in q2.state_dict().items()} == {k: v.shape for k, v in q.state_dict().items()}
    q2.load_state_dict(q.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


def test_save_and_load(tmp_path):
    lin, x = _layer_and_input()
    model = nn.Sequential(QLinearOutlier.from_float(lin, OUTLIERS))
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", model=nn.Sequential(nn.Linear(256, 64)))
    assert isinstance(loaded[0], QLinearOutlier)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_rejects_bad_shapes():
    with pytest.raises(LowbitError, match=r"n_outliers must be in \[0, 8\)"):
        QLinearOutlier(8, 4, 8)
    q = QLinearOutlier(8, 4, 2)
    with pytest.raises(LowbitError, match=r"3 indices / weight \(4, 3\) do not fit 2 outliers"):
        q.set_outliers(torch.tensor([0, 1, 2]), torch.zeros(4, 3))
    with pytest.raises(LowbitError, match="unique"):
        q.set_outliers(torch.tensor([1, 1]), torch.zeros(4, 2))
