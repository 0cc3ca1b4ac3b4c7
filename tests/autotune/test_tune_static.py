"""Mixed 4/8-bit static plans (``StaticW8A8.layer_bits``) on a small CNN with BatchNorm: planned bits
land on the integer layers, bad names are refused with the model left as it was."""

import copy

import pytest
import torch

import lowbit
from lowbit.autotune import Budget, choose, own_label_loss, sensitivity_table
from lowbit.core.errors import LowbitError
from lowbit.models.vision import SmallCNN


def _model():
    torch.manual_seed(0)
    return SmallCNN().eval()


def _images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def table():
    base = lowbit.StaticW8A8()
    return sensitivity_table(_model(), _images(), ["w4-sym", "w8-sym"], base=base, loss_fn=own_label_loss)


def test_static_plan_sets_each_layers_bits(table):
    base = lowbit.StaticW8A8()
    plan = choose(table, Budget(bits=6.0), base)
    assert plan.bits_per_weight <= 6.0 and set(plan.config.layer_bits.values()) <= {4, 8}
    model = _model()
    lowbit.quantize_(model, plan.config, _images())
    for name, bits in plan.config.layer_bits.items():
        assert model.get_submodule(name).spec.fmt.bits == bits
    again = lowbit.transforms.configs.config_from_dict(plan.config.to_dict())
    assert again == plan.config


def test_static_candidates_must_be_symmetric_per_channel():
    with pytest.raises(LowbitError, match="symmetric per-channel"):
        sensitivity_table(
            _model(), _images(), ["w4g16", "w8-sym"], base=lowbit.StaticW8A8(), loss_fn=own_label_loss
        )


def test_layer_bits_naming_no_layer_is_refused_and_the_model_kept():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LowbitError, match="'features.9'"):
        lowbit.quantize_(model, lowbit.StaticW8A8(layer_bits={"features.9": 4}), _images())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(LowbitError, match="integer 2..8"):
        lowbit.StaticW8A8(layer_bits={"classifier": 9})
