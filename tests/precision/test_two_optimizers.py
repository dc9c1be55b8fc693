"""``16-mixed`` with two optimizers against torch's AMP recipe for several models, losses and
optimizers: one GradScaler, ``unscale_`` and ``step`` per optimizer, one ``update()`` per iteration.
Same seed, same data: ember's parameters and loss scale must be the plain loop's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, Trainer, TrainModule
from ember.precision import MixedPrecision

# growth_interval=1: the scale doubles at every update, so an extra update per iteration shows in
# the scale, and soon in an inf step skipped at a different iteration.
_SCALER = {"init_scale": 2.0**10, "growth_interval": 1}
_STEPS = 12


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(4, 4), nn.Linear(4, 1)


def _data() -> torch.Tensor:
    return torch.randn(_STEPS, 8, 4, generator=torch.Generator().manual_seed(1))


def _plain(clip: bool) -> tuple[list[torch.Tensor], float]:
    first, second = _models()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (first, second)]
    scaler = torch.amp.GradScaler("cpu", **_SCALER)
    for x in _data():
        for opt in opts:
            opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            hidden, out = first(x), second(x)
        loss0, loss1 = hidden.float().pow(2).mean(), out.float().pow(2).mean()
        scaler.scale(loss0).backward()
        scaler.scale(loss1).backward()
        for opt, model in zip(opts, (first, second), strict=True):
            scaler.unscale_(opt)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        for opt in opts:
            scaler.step(opt)
        scaler.update()
    return [p.detach() for m in (first, second) for p in m.parameters()], scaler.get_scale()


def _ember(clip: bool) -> tuple[list[torch.Tensor], float]:
    first, second = _models()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (first, second)]
    precision = MixedPrecision("16-mixed", scaler=torch.amp.GradScaler("cpu", **_SCALER))
    accelerator = Accelerator(precision=precision)
    first, second, opt0, opt1 = accelerator.prepare(first, second, *opts)
    for x in _data():
        opt0.zero_grad()
        opt1.zero_grad()
        accelerator.backward(first(x).pow(2).mean())
        accelerator.backward(second(x).pow(2).mean())
        if clip:  # each clip unscales the optimizers of its parameters: both, before either steps
            accelerator.clip_grad_norm_(first.parameters(), 0.5)
            accelerator.clip_grad_norm_(second.parameters(), 0.5)
        else:
            accelerator.unscale_gradients()
        opt0.step()
        opt1.step()
    params = [p.detach() for m in (first, second) for p in m.parameters()]
    return params, accelerator.scaler.get_scale()


def test_accelerator_two_optimizers_unscaled_before_either_steps_match_torch_recipe() -> None:
    for clip in (False, True):
        expected, expected_scale = _plain(clip)
        params, scale = _ember(clip)
        assert scale == expected_scale
        for got, want in zip(params, expected, strict=True):
            torch.testing.assert_close(got, want)


# -- the Trainer: a GAN-style manual loop -----------------------------------------------------------
def _gan_plain() -> tuple[list[torch.Tensor], float]:
    disc, gen = _models()
    d_opt, g_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (disc, gen))
    scaler = torch.amp.GradScaler("cpu", **_SCALER)
    for x in _data():
        with torch.autocast("cpu", dtype=torch.float16):  # (the loss too: training_step runs in autocast)
            d_loss = disc(x).pow(2).mean()
        d_opt.zero_grad()
        scaler.scale(d_loss).backward()
        scaler.unscale_(d_opt)
        nn.utils.clip_grad_norm_(disc.parameters(), 0.5)
        scaler.step(d_opt)
        with torch.autocast("cpu", dtype=torch.float16):  # (the loss too: training_step runs in autocast)
            g_loss = gen(x).pow(2).mean()
        g_opt.zero_grad()
        scaler.scale(g_loss).backward()
        scaler.step(g_opt)
        scaler.update()
    return [p.detach() for m in (disc, gen) for p in m.parameters()], scaler.get_scale()


class _Gan(TrainModule):
    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self.disc, self.gen = _models()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        d_opt, g_opt = self.optimizers()
        (x,) = batch
        d_opt.zero_grad()
        self.manual_backward(self.disc(x).pow(2).mean())
        self.clip_gradients(d_opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        d_opt.step()
        g_opt.zero_grad()
        self.manual_backward(self.gen(x).pow(2).mean())
        g_opt.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.disc, self.gen)]


def test_trainer_manual_gan_with_16_mixed_matches_torch_recipe(tmp_path: Path) -> None:
    expected, expected_scale = _gan_plain()
    module = _Gan()
    precision = MixedPrecision("16-mixed", scaler=torch.amp.GradScaler("cpu", **_SCALER))
    trainer = Trainer(default_root_dir=str(tmp_path), precision=precision, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(_data().reshape(-1, 4)), batch_size=8))
    assert precision.scaler is not None and precision.scaler.get_scale() == expected_scale
    params = [p.detach() for m in (module.disc, module.gen) for p in m.parameters()]
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_accelerator_optimizers_stepping_at_different_rates_step_their_true_gradients() -> None:
    # The generator steps every other iteration: the discriminator steps again before the iteration
    # could end, so the scale is updated then; its gradients, scaled by the old scale, must still be
    # unscaled to their true values (the scale grows at every update here).
    disc, gen = nn.Linear(4, 1), nn.Linear(4, 1)
    precision = MixedPrecision("16-mixed", scaler=torch.amp.GradScaler("cpu", **_SCALER))
    accelerator = Accelerator(precision=precision)
    disc, gen, d_opt, g_opt = accelerator.prepare(
        disc, gen, *(torch.optim.SGD(m.parameters(), lr=1.0) for m in (disc, gen))
    )
    scales = set()
    for i, x in enumerate(_data()):
        true_grad = x.mean(dim=0, keepdim=True) * 1e-3
        for model, opt in ((disc, d_opt), (gen, g_opt)) if i % 2 == 0 else ((disc, d_opt),):
            before = model.weight.detach().clone()
            opt.zero_grad()
            accelerator.backward(model(x).mean() * 1e-3)
            accelerator.clip_grad_norm_(model.parameters(), 100.0)
            opt.step()
            torch.testing.assert_close(before - model.weight.detach(), true_grad, rtol=1e-2, atol=1e-7)
            scales.add(accelerator.scaler.get_scale())
    assert len(scales) > 3  # the scale did change while the optimizers stepped
