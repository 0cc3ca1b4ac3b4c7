"""rollback_on_error: a failing block leaves the model as it came; a passing one keeps its edits."""

import pytest
import torch
from torch import nn

from lowbit.transforms.rollback import rollback_on_error


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))


def _edit(net):
    """The kinds of edits BatchNorm folding and rescaling make."""
    with torch.no_grad():
        net[0].weight.mul_(3)  # in place
        net[1].running_mean.add_(1)
    net[3].bias = nn.Parameter(torch.ones(2))  # a new parameter
    net[0].weight = nn.Parameter(net[0].weight * 2)  # a re-assigned one
    net[1] = nn.Identity()  # a swapped module
    net.lowbit_inputs = {"x": (1, 2)}  # an attribute added


def test_error_restores_everything():
    net = _net()
    modules, state = list(net.modules()), {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[0].weight
    with pytest.raises(ValueError, match="calibration failed"):
        with rollback_on_error(net):
            _edit(net)
            raise ValueError("calibration failed")
    assert list(net.modules()) == modules and net[0].weight is weight
    assert net[3].bias is None and not hasattr(net, "lowbit_inputs")
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_success_keeps_the_edits():
    net = _net()
    with rollback_on_error(net):
        _edit(net)
    assert isinstance(net[1], nn.Identity) and net[3].bias is not None and hasattr(net, "lowbit_inputs")
