"""Sensitivity measures on a tiny model: Fisher diagonals by hand, errors, one-layer losses, Spearman."""

import pytest
import torch
from torch import nn

from lowbit.autotune.candidates import Candidate
from lowbit.autotune.sensitivity import (
    fisher_diagonals,
    one_layer_losses,
    spearman,
    weight_errors,
    weight_layers,
)
from lowbit.core.errors import LowbitError, NonFiniteError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(n)]


def test_linear_fisher_is_the_mean_squared_per_sample_gradient_and_leaves_the_model_alone():
    model, batches = _model(), _batches()
    model[2].bias.requires_grad_(False)
    layers = weight_layers(model, lambda n: True)
    got = fisher_diagonals(model, batches, _loss, layers)
    for name, m in layers.items():
        want, rows = torch.zeros_like(m.weight), 0
        for x, y in batches:
            for i in range(len(x)):
                (g,) = torch.autograd.grad(_loss(model, (x[i : i + 1], y[i : i + 1])), [m.weight])
                want += g.square()
                rows += 1
        torch.testing.assert_close(got[name], want / rows)
    assert model[0].weight.grad is None and not model[2].bias.requires_grad and model[0].bias.requires_grad


def test_conv_fisher_is_the_mean_squared_batch_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 8, (5,), generator=g)) for _ in range(2)
    ]
    got = fisher_diagonals(model, batches, _loss, {"0": model[0]})
    want = sum(torch.autograd.grad(_loss(model, b), [model[0].weight])[0].square() for b in batches) / 2
    torch.testing.assert_close(got["0"], want)


def test_fisher_refuses_a_nan_loss_and_an_empty_set():
    model = _model()
    layers = weight_layers(model, lambda n: True)
    with pytest.raises(NonFiniteError, match="batch 0"):
        fisher_diagonals(model, _batches(1), lambda m, b: _loss(m, b) * float("nan"), layers)
    with pytest.raises(LowbitError, match="empty"):
        fisher_diagonals(model, [], _loss, layers)
    assert all(p.requires_grad for p in model.parameters())


def test_errors_shrink_with_bits_and_skip_shapes_that_do_not_fit():
    model = _model()
    layers = weight_layers(model, lambda n: True)
    fisher = fisher_diagonals(model, _batches(), _loss, layers)
    cands = [Candidate(2, 16), Candidate(4, 16), Candidate(8), Candidate(4, 64)]
    errs = weight_errors(layers, cands, fisher)
    assert set(errs["0"]) == {"w2g16", "w4g16", "w8", "w4g64"} and "w4g64" not in errs["2"]
    for row in errs.values():
        assert row["w2g16"]["frobenius"] > row["w4g16"]["frobenius"] > row["w8"]["frobenius"] > 0
        assert row["w2g16"]["fisher"] > row["w4g16"]["fisher"] > row["w8"]["fisher"] >= 0


def test_one_layer_losses_restore_weights():
    model, batches = _model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = one_layer_losses(model, batches, _loss, weight_layers(model, lambda n: True), Candidate(2, 16))
    assert set(got) == {"0", "2"} and all(v == v for v in got.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(LowbitError, match="same length"):
        spearman([1, 2], [1])
