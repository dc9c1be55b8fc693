"""Review findings on the precision plugins, each checked against what Lightning 2.6.6 does."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from dist_helpers import run_processes
from torch import nn

from ember import Accelerator


class _MakesTensors(nn.Module):
    """Creates a floating tensor inside forward, as RNN initial states and masks do."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) @ torch.eye(4)


@pytest.mark.parametrize(
    ("name", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.bfloat16), ("16-true", torch.float16)]
)
def test_true_precisions_create_tensors_in_their_dtype_inside_forward(name: str, dtype: torch.dtype) -> None:
    # Lightning's HalfPrecision / DoublePrecision set the default dtype in forward_context.
    accelerator = Accelerator(precision=name)
    model = accelerator.prepare(_MakesTensors())
    assert model(torch.randn(2, 4)).dtype == dtype
    assert torch.get_default_dtype() == torch.float32  # put back after the forward
    with accelerator.autocast():
        assert torch.zeros(1).dtype == dtype
    assert torch.get_default_dtype() == torch.float32


def test_16_mixed_clipping_after_another_optimizer_stepped_sees_unscaled_gradients() -> None:
    # A GAN-style loop: each phase clips (which unscales every prepared optimizer, as in Accelerate)
    # and steps its own optimizer. The second phase must clip and step its true gradients.
    torch.manual_seed(0)
    accelerator = Accelerator(precision="16-mixed")
    disc, gen = nn.Linear(4, 1), nn.Linear(4, 1)
    disc_opt = torch.optim.SGD(disc.parameters(), lr=1.0)
    gen_opt = torch.optim.SGD(gen.parameters(), lr=1.0)
    disc, gen, disc_opt, gen_opt = accelerator.prepare(disc, gen, disc_opt, gen_opt)
    x = torch.randn(8, 4)
    for _ in range(2):
        accelerator.backward(disc(x).mean() * 1e-3)
        accelerator.clip_grad_norm_(disc.parameters(), 100.0)
        disc_opt.step()
        disc_opt.zero_grad()
        before = gen.weight.detach().clone()
        accelerator.backward(gen(x).mean() * 1e-3)
        norm = accelerator.clip_grad_norm_(gen.parameters(), 100.0)
        true_grad = x.mean(dim=0, keepdim=True) * 1e-3
        assert norm.item() < 1.0  # the true norm, not the scaled one
        gen_opt.step()
        gen_opt.zero_grad()
        torch.testing.assert_close(before - gen.weight.detach(), true_grad, rtol=1e-2, atol=1e-6)


def _accumulated_update(clip: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    accelerator = Accelerator(precision="16-mixed", gradient_accumulation_steps=2)
    model = nn.Linear(4, 1)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    norms = []
    for x in torch.randn(2, 8, 4):
        with accelerator.accumulate(model):
            accelerator.backward(model(x).mean() * 1e-3)
            if clip == "norm":
                norms.append(accelerator.clip_grad_norm_(model.parameters(), 10.0))
            elif clip == "value":
                accelerator.clip_grad_value_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad()
    assert all(n.item() < 1.0 for n in norms)  # true norms, not the scaled ones
    return before - model.weight.detach(), torch.stack(norms) if norms else torch.zeros(0)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_16_mixed_clipping_on_micro_steps_acts_on_true_gradients(clip: str) -> None:
    # Clipping on every micro-step (with a bound no true gradient reaches) must leave the update as
    # it is: the scaled gradients may not be clipped to the unscaled bound.
    expected, _ = _accumulated_update(None)
    update, _ = _accumulated_update(clip)
    torch.testing.assert_close(update, expected)


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true", "64-true"])
def test_a_deep_copy_of_a_prepared_model_runs_its_own_weights(name: str) -> None:
    # e.g. an EMA or teacher copy: the copy's forward must not call the original module.
    accelerator = Accelerator(precision=name)
    model = accelerator.prepare(nn.Linear(4, 1))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.weight.zero_()
        copied.bias.zero_()
    x = torch.ones(1, 4)
    assert copied(x).abs().sum().item() == 0.0
    assert model(x).abs().sum().item() != 0.0
    assert copied(x).dtype == model(x).dtype  # the copy keeps the precision's forward
    accelerator.unwrap_model(copied, keep_fp32_wrapper=False)  # only the copy loses the patch
    assert "forward" not in copied.__dict__ and "forward" in model.__dict__


class _Probe(nn.Linear):
    """Records whether its forward ran under autocast."""

    autocast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast = torch.is_autocast_enabled("cpu")
        return super().forward(x)


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true"])
def test_a_prepared_model_pickles_and_loads_as_a_plain_module(name: str) -> None:
    # As 🤗 Accelerate's: torch.save(model) works; the loaded module has no precision patch, and a
    # later prepare() patches it again.
    model = Accelerator(precision=name).prepare(_Probe(4, 1))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).float()
    x = torch.ones(1, 4)
    loaded(x)
    assert not loaded.autocast
    again = Accelerator(precision="bf16-mixed").prepare(loaded)
    assert again(x).dtype == torch.float32 and again.autocast


# -- 16-mixed under DDP on 2 processes (gloo) ----------------------------------------------------
def _ddp_16_mixed_worker() -> dict:
    accelerator = Accelerator(precision="16-mixed", gradient_accumulation_steps=2)
    first_scale = accelerator.precision.state_dict()
    results: dict = {}
    for clip in (False, True):  # the same run twice, from the same weights and loss scale
        accelerator.precision.load_state_dict(first_scale)
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        torch.manual_seed(1 + accelerator.process_index)
        skipped = []
        for step in range(6):
            x = torch.randn(8, 4)
            if step == 3 and accelerator.process_index == 1:
                x[0, 0] = float("inf")  # one rank's inf gradient: every rank must skip that step
            with accelerator.accumulate(model):
                accelerator.backward(model(x).mean() * 1e-3)
                if clip:  # on every micro-step, with a bound the true gradients never reach
                    accelerator.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
                optimizer.zero_grad()
            skipped.append(optimizer.step_was_skipped)
        results[str(clip)] = {"skipped": skipped, "params": [p.tolist() for p in model.parameters()]}
    return results


def test_16_mixed_on_two_processes_skips_together_and_clips_true_gradients() -> None:
    ranks = run_processes(_ddp_16_mixed_worker, nprocs=2)
    for rank in ranks:
        assert rank["False"]["skipped"] == [True, False, True, True, True, False]  # step 3: inf on rank 1
        assert rank["True"] == rank["False"]  # clipping true gradients below the bound changes nothing
    assert ranks[0] == ranks[1]


def test_a_plugin_made_for_another_device_is_refused_before_the_run_starts() -> None:
    from ember.precision import MixedPrecision

    with pytest.raises(ValueError, match=r"device_type='cuda'\): this run's device is 'cpu'"):
        Accelerator(cpu=True, precision=MixedPrecision("bf16-mixed", "cuda"))
    assert Accelerator(cpu=True, precision=MixedPrecision("bf16-mixed", "cpu")).mixed_precision == "bf16"


def test_mixed_precision_takes_lightnings_device_keyword() -> None:
    from ember.precision import MixedPrecision

    assert MixedPrecision(precision="bf16-mixed", device="cuda").device_type == "cuda"
    with pytest.raises(ValueError, match=r"device_type='cuda', device='xla'\): give one of the two"):
        MixedPrecision("bf16-mixed", "cuda", device="xla")
