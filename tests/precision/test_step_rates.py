"""``16-mixed`` in a hand-written loop whose optimizers step at different rates: the scale is updated
once a round (each optimizer stepped once), gradients waiting for a later step follow the scale,
and a checkpoint taken mid-round resumes on the scale the uninterrupted run uses."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ember import Accelerator
from ember.precision import MixedPrecision, Precision

# growth_interval=1: the scale doubles at every update, so a missed or an extra update shows.
_SCALER = {"init_scale": 2.0**4, "growth_interval": 1}
_STEPS = 6


def _data() -> torch.Tensor:
    return torch.randn(_STEPS, 8, 4, generator=torch.Generator().manual_seed(1))


def _prepared() -> tuple[Accelerator, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 1), nn.Linear(4, 1)
    precision = MixedPrecision("16-mixed", scaler=torch.amp.GradScaler("cpu", **_SCALER))
    accelerator = Accelerator(precision=precision)
    first, second, opt_a, opt_b = accelerator.prepare(
        first, second, *(torch.optim.SGD(m.parameters(), lr=1.0) for m in (first, second))
    )
    return accelerator, first, second, opt_a, opt_b


def test_gradients_of_an_optimizer_that_has_not_stepped_yet_follow_an_early_scale_update() -> None:
    # B accumulates over two iterations and A steps every iteration: A's second step updates the
    # scale before B ever stepped, while B's gradients still hold the old scale.
    accelerator, first, second, opt_a, opt_b = _prepared()
    accumulated = torch.zeros(1, 4)
    before = second.weight.detach().clone()
    for i, x in enumerate(_data()):
        opt_a.zero_grad()
        if i % 2 == 0:
            opt_b.zero_grad()
            accumulated.zero_()
            before = second.weight.detach().clone()
        accelerator.backward(first(x).mean() * 1e-3 + second(x).mean() * 1e-3)
        accumulated += x.mean(dim=0, keepdim=True) * 1e-3
        opt_a.step()
        if i % 2 == 1:
            opt_b.step()
            torch.testing.assert_close(before - second.weight.detach(), accumulated, rtol=1e-2, atol=1e-7)
    assert accelerator.scaler is not None and accelerator.scaler.get_scale() > _SCALER["init_scale"]


def _iterations(
    prepared: tuple[Accelerator, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer],
    steps: range,
) -> None:
    """A steps every iteration, B every second one (after its own backward)."""
    accelerator, first, second, opt_a, opt_b = prepared
    data = _data()
    for i in steps:
        opt_a.zero_grad()
        accelerator.backward(first(data[i]).mean() * 1e-3)
        opt_a.step()
        if i % 2 == 1:
            opt_b.zero_grad()
            accelerator.backward(second(data[i]).mean() * 1e-3)
            opt_b.step()


def _result(
    prepared: tuple[Accelerator, nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer],
) -> tuple[float, list[torch.Tensor]]:
    accelerator, first, second = prepared[:3]
    assert accelerator.scaler is not None
    return accelerator.scaler.get_scale(), [
        p.detach().clone() for m in (first, second) for p in m.parameters()
    ]


def test_a_checkpoint_saved_mid_round_resumes_on_the_uninterrupted_scale(tmp_path: Path) -> None:
    reference = _prepared()
    _iterations(reference, range(_STEPS))
    expected_scale, expected = _result(reference)

    saving = _prepared()
    _iterations(saving, range(3))  # iteration 2: A stepped, B not: the scale's update is pending
    ckpt = saving[0].save_state(tmp_path / "ckpt")
    _iterations(saving, range(3, _STEPS))  # (saving does not change the run)

    resumed = _prepared()  # a new run
    resumed[0].load_state(ckpt)
    _iterations(resumed, range(3, _STEPS))

    reloaded = _prepared()  # a run that loads the checkpoint with a round of its own pending
    _iterations(reloaded, range(3))
    reloaded[0].load_state(ckpt)
    _iterations(reloaded, range(3, _STEPS))

    for run in (saving, resumed, reloaded):
        scale, params = _result(run)
        assert scale == expected_scale
        for got, want in zip(params, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_a_step_without_a_grad_scaler_does_not_end_the_iteration() -> None:
    assert not Precision().ends_iterations
    assert not MixedPrecision("bf16-mixed").ends_iterations
    assert MixedPrecision("16-mixed").ends_iterations
    for name, expected in (("bf16-mixed", 0), ("16-mixed", 1)):
        precision = MixedPrecision(name)
        calls: list[object] = []
        precision.end_iteration = calls.append  # type: ignore[method-assign,assignment]
        accelerator = Accelerator(precision=precision)
        model = nn.Linear(4, 1)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        accelerator.backward(model(torch.ones(2, 4)).sum())
        optimizer.step()
        assert len(calls) == expected, name
