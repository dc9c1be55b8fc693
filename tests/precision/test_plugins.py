"""Each precision plugin trains a step; dtypes are what the names promise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator
from ember.precision import PRECISION_REGISTRY, HalfPrecision, MixedPrecision, Precision, resolve_precision

PARAM_DTYPE = {
    "32-true": torch.float32,
    "64-true": torch.float64,
    "16-mixed": torch.float32,
    "bf16-mixed": torch.float32,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}
COMPUTE_DTYPE = {**PARAM_DTYPE, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def test_registry_lists_every_plugin() -> None:
    assert PRECISION_REGISTRY.names() == sorted(PARAM_DTYPE)
    with pytest.raises(
        ValueError, match=r"precision='8-bit' is not a known precision\. Valid choices: '16-mixed', '16-true'"
    ):
        resolve_precision("8-bit", device_type="cpu")
    assert resolve_precision(16, device_type="cpu").name == "16-mixed"
    assert resolve_precision("bf16", device_type="cpu").name == "bf16-mixed"
    with pytest.raises(TypeError, match=r"precision=1\.5"):
        resolve_precision(1.5, device_type="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a mixed precision"):
        MixedPrecision("16-true")
    with pytest.raises(ValueError, match="not a true half precision"):
        HalfPrecision("bf16-mixed")


@pytest.mark.parametrize("name", sorted(PARAM_DTYPE))
def test_each_plugin_runs_a_training_step(name: str) -> None:
    torch.manual_seed(0)
    accelerator = Accelerator(precision=name)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randn(8, 1)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    for _ in range(20):  # 16-mixed: the grad scaler skips the first steps until its scale fits fp16
        output = model(x)  # float32 inputs: the plugin casts them where needed
        loss = F.mse_loss(output.float(), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if not optimizer.step_was_skipped:
            break
    assert seen["dtype"] == COMPUTE_DTYPE[name]  # bf16-mixed: the forward really runs in bf16
    assert all(p.dtype == PARAM_DTYPE[name] for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
    assert torch.isfinite(loss)
    if name.endswith("mixed"):
        assert output.dtype == torch.float32  # outputs leave autocast in full precision


def test_autocast_context() -> None:
    accelerator = Accelerator(precision="bf16-mixed")
    with accelerator.autocast():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16
    with Accelerator().autocast():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_grad_scaler_skips_inf_steps_and_unscales_before_clipping() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accelerator = Accelerator(precision=MixedPrecision("16-mixed", scaler=scaler))
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start_scale = scaler.get_scale()

    accelerator.backward(model(torch.ones(1, 2)).sum())
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=100.0)
    expected = torch.cat([torch.ones(2), torch.ones(1)]).norm()  # d(sum(Wx+b))/d(W,b) at x = 1
    torch.testing.assert_close(norm, expected)  # measured after unscaling
    optimizer.step()
    scheduler.step()
    assert not optimizer.step_was_skipped and scheduler.get_last_lr() == [0.05]
    assert not accelerator.optimizer_step_was_skipped
    optimizer.zero_grad()

    weight = model.weight.detach().clone()
    accelerator.backward(model(torch.full((1, 2), float("inf"))).sum())
    optimizer.step()
    scheduler.step()
    assert optimizer.step_was_skipped and accelerator.optimizer_step_was_skipped
    assert torch.equal(model.weight, weight)  # the step was skipped
    assert scheduler.get_last_lr() == [0.05]  # and so was the scheduler
    assert scaler.get_scale() < start_scale
    state = accelerator.precision.state_dict()
    assert state["scale"] == scaler.get_scale()


def test_base_class_is_fp32_no_op() -> None:
    plugin = Precision()
    module = nn.Linear(2, 2)
    assert plugin.convert_module(module) is module and plugin.convert_input("x") == "x"
    assert plugin.state_dict() == {} and not plugin.wraps_forward


def test_half_module_init_context() -> None:
    with resolve_precision("bf16-true", device_type="cpu").module_init_context():
        assert nn.Linear(2, 2).weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_unwrap_model_can_drop_the_precision_wrapper() -> None:
    accelerator = Accelerator(precision="bf16-mixed")
    model = accelerator.prepare(nn.Linear(2, 2))
    assert model(torch.ones(1, 2)).dtype == torch.float32
    inner = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert inner(torch.ones(1, 2)).dtype == torch.bfloat16
