"""Top-1 predictions, accuracy and agreement: exact values on hand-made logits, batching, validation."""

import pytest
import torch
from torch import nn

from lowbit.core.errors import LowbitError
from lowbit.eval.accuracy import accuracy, agreement, predict


class Scale(nn.Module):
    """Logits = images * w (a model with one parameter, so predictions are argmax of the images)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return x * self.w


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, generator=g)
    return logits, logits.argmax(dim=1)


@pytest.mark.parametrize("batch_size", [1, 3, 256], ids=lambda b: f"batch{b}")
def test_predict_is_argmax_for_any_batch_size(data, batch_size):
    logits, top1 = data
    model = Scale().train()
    out = predict(model, logits, batch_size=batch_size)
    assert out.dtype == torch.int64 and torch.equal(out, top1)
    assert model.training and not any(model.seen_training)  # ran in eval mode, mode restored
    assert len(model.seen_training) == -(-10 // batch_size)


def test_predict_without_grad(data):
    class Check(Scale):
        def forward(self, x):
            assert not torch.is_grad_enabled()
            return super().forward(x)

    predict(Check(), data[0])


def test_accuracy_and_agreement_percent(data):
    logits, top1 = data
    wrong = (top1 + 1) % 5
    half = torch.where(torch.arange(10) < 5, top1, wrong)
    assert accuracy(Scale(), logits, top1) == 100.0
    assert accuracy(Scale(), logits, half, batch_size=4) == 50.0
    assert agreement(Scale(), wrong, logits) == 0.0
    assert agreement(Scale(), half.int(), logits) == 50.0  # any integer dtype


def test_model_without_parameters(data):
    logits, top1 = data
    assert accuracy(nn.Identity(), logits, top1) == 100.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: predict(Scale(), d[0][:0]), r"images is empty"),
        (lambda d: predict(Scale(), torch.zeros(4)), r"images must be a tensor \(N, \.\.\.\).*shape \(4,\)"),
        (lambda d: predict(Scale(), d[0], batch_size=0), "batch_size must be at least 1, got 0"),
        (lambda d: accuracy(Scale(), d[0], d[1][:9]), "labels has 9 entries but there are 10 images"),
        (lambda d: accuracy(Scale(), d[0], d[1][:, None]), r"labels must be a 1-D tensor.*shape \(10, 1\)"),
        (lambda d: agreement(Scale(), [0] * 10, d[0]), "reference_predictions must be a 1-D tensor.*list"),
        (
            lambda d: agreement(Scale(), d[1][:3], d[0]),
            "reference_predictions has 3 entries but there are 10",
        ),
        (lambda d: predict(nn.Flatten(0), d[0]), r"model must return logits \(batch, classes\), got shape"),
    ],
    ids=["empty", "1d-images", "batch-size", "length", "2d-labels", "list", "ref-length", "output-shape"],
)
def test_errors(data, call, match):
    with pytest.raises(LowbitError, match=match):
        call(data)
