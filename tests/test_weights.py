import pytest
import torch
from opacus import GradSampleModule

from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state, strip_prefixes, unwrap


def test_opacus_prefix_is_stripped_and_weights_load_into_plain_network():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.GroupNorm(1, 2))
    wrapped = GradSampleModule(net)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    state = exchangeable_state(wrapped)
    assert set(state) == set(net.state_dict())
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.GroupNorm(1, 2))
    load_exchangeable_state(plain, state)
    assert torch.equal(plain[0].weight, net[0].weight)
    assert unwrap(wrapped) is net


def test_load_rejects_mismatched_keys():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="missing"):
        load_exchangeable_state(net, {"weight": torch.zeros(2, 2)})


def test_strip_prefixes_nested():
    assert list(strip_prefixes({"module._module.a.b": 1})) == ["a.b"]


def test_strip_prefixes_refuses_colliding_keys():
    import pytest

    with pytest.raises(KeyError, match="collide"):
        strip_prefixes({"_module.a": 1, "a": 2})
