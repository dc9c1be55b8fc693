"""Manual optimisation: a tiny GAN on 2-D points, with one optimizer for each network.

    python examples/manual_optimization.py [--epochs 30]

The real data are points around (2, -1). The generator turns noise into points, the discriminator
tells real points from generated ones, and each has its own optimizer. With
``automatic_optimization = False`` the Trainer hands ``training_step`` the batch and lets it run
the two updates itself: ``self.optimizers()``, ``self.manual_backward(loss)``, ``optimizer.step()``.
The Trainer still counts the steps, logs, checkpoints and resumes.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule, seed_everything

CENTER = torch.tensor([2.0, -1.0])


class TinyGAN(TrainModule):
    automatic_optimization = False

    def __init__(self, noise_dim: int = 4, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generator = nn.Sequential(nn.Linear(noise_dim, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(noise)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        noise = torch.randn(real.shape[0], self.hparams["noise_dim"], device=real.device)
        ones = torch.ones(real.shape[0], 1, device=real.device)

        # Discriminator: real points -> 1, generated points -> 0 (the generator is not updated).
        fake = self(noise).detach()
        d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        d_loss = d_loss + F.binary_cross_entropy_with_logits(self.discriminator(fake), 0 * ones)
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()

        # Generator: make the discriminator say 1 for generated points.
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(noise)), ones)
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()  # the discriminator's gradients from this pass are cleared before its next step

        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.hparams["lr"]
        return [
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999)),
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--root", default="runs/gan", help="checkpoints and logs go here")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    real = CENTER + 0.3 * torch.randn(1024, 2, generator=g)
    loader = DataLoader(TensorDataset(real), batch_size=64, shuffle=True)
    seed_everything(0)  # before the model is built: its initial weights too are the same on every run
    gan = TinyGAN()
    trainer = Trainer(max_epochs=args.epochs, default_root_dir=args.root, seed=0, log_every_n_steps=16)
    trainer.fit(gan, loader)
    if trainer.is_global_zero:
        with torch.no_grad():
            samples = gan(torch.randn(2048, gan.hparams["noise_dim"]))
        mean = samples.mean(0)
        print(f"optimizer steps: {trainer.global_step}")
        print(
            f"generated mean: ({mean[0]:.2f}, {mean[1]:.2f})  real mean: ({CENTER[0]:.2f}, {CENTER[1]:.2f})"
        )
        print(f"distance to the real mean: {(mean - CENTER).norm():.3f}")


if __name__ == "__main__":
    main()
