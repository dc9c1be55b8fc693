"""``init_empty_weights`` / ``init_on_device`` (🤗 Accelerate's context managers) and ``prepare``'s
refusal of a model whose parameters are still on the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember import Accelerator, init_empty_weights, init_on_device


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


class Tagged(nn.Parameter):
    """A Parameter subclass with an attribute, as sharding and quantisation libraries make them."""


class WithTagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tagged = Tagged(torch.ones(3), requires_grad=False)
        tagged.shard_axis = 1
        self.tagged = tagged
        self.plain = nn.Parameter(torch.zeros(2))


def test_parameters_go_to_meta_and_buffers_stay_on_the_cpu() -> None:
    with init_empty_weights():
        model = _net()
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 4 * 8 + 8 + 8 + 8 + 8 + 1
    assert all(b.device.type == "cpu" for b in model.buffers())  # running_mean, running_var, count
    with init_empty_weights(include_buffers=True):
        everything = _net()
    assert all(t.is_meta for t in [*everything.parameters(), *everything.buffers()])


def test_a_parameters_class_requires_grad_and_attributes_are_kept() -> None:
    with init_empty_weights():
        module = WithTagged()
    assert type(module.tagged) is Tagged and module.tagged.is_meta
    assert module.tagged.requires_grad is False and module.tagged.shard_axis == 1
    assert type(module.plain) is nn.Parameter and module.plain.requires_grad


def test_torch_is_left_as_it_was_after_the_context_even_on_an_exception() -> None:
    original = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="inside"), init_empty_weights():
        with init_on_device("cpu"):  # nested: each puts back what it found
            pass
        raise RuntimeError("inside")
    assert nn.Module.register_parameter is original
    assert not nn.Linear(2, 2).weight.is_meta


def test_init_on_device_and_bad_arguments() -> None:
    with init_on_device(torch.device("cpu")):
        layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu" and not layer.weight.is_meta
    with pytest.raises(ValueError, match=r"device='nowhere' is not a torch device. Valid choices: 'meta'"):
        with init_on_device("nowhere"):
            pass
    with pytest.raises(ValueError, match=r"include_buffers='yes'. Valid choices: True, False"):
        with init_empty_weights(include_buffers="yes"):  # type: ignore[arg-type]
            pass


def test_prepare_refuses_an_empty_model_then_trains_the_filled_one_as_a_normal_one() -> None:
    torch.manual_seed(0)
    reference = _net()
    with init_empty_weights():
        model = _net()
    accelerator = Accelerator(cpu=True)
    with pytest.raises(
        ValueError, match=r"parameter '0.weight' of the Sequential is on the meta device.*to_empty"
    ):
        accelerator.prepare(model)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for net in (reference, model):
        prepared, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        accelerator.backward(F.mse_loss(prepared(x), y))
        optimizer.step()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
