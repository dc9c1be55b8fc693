"""A user-written callback: log the gradient norm, remember the best loss, stop on a loss spike.

    python examples/custom_callback.py

It shows the three things a callback usually does: read what the module logged
(``trainer.callback_metrics``), act at a hook (``on_before_optimizer_step``, ``on_train_epoch_end``),
and keep state that survives a resume (``state_dict`` / ``load_state_dict``, stored in checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback


class SpikeGuard(Callback):
    """Logs ``grad_norm`` every step and stops the fit if an epoch's loss exceeds ``factor`` x the best."""

    def __init__(self, factor: float = 3.0) -> None:
        self.factor = factor
        self.best_loss = float("inf")
        self.epochs_seen = 0

    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are already unscaled here (16-mixed), so the norm is the true one.
        grads = [
            p.grad.detach().flatten()
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        module.log("grad_norm", torch.cat(grads).norm())

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        self.epochs_seen += 1
        loss = float(trainer.callback_metrics["loss_epoch"])
        if loss > self.factor * self.best_loss:
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(
                    f"SpikeGuard: epoch loss {loss:.4f} > {self.factor} x best {self.best_loss:.4f}, stopping"
                )
        self.best_loss = min(self.best_loss, loss)

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss, self.epochs_seen = state_dict["best_loss"], state_dict["epochs_seen"]


class Regression(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    guard = SpikeGuard()
    trainer = Trainer(
        max_epochs=5, callbacks=[guard], default_root_dir="runs/custom_callback", log_every_n_steps=4
    )
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    if trainer.is_global_zero:
        print(f"epochs seen: {guard.epochs_seen}, best epoch loss: {guard.best_loss:.4f}")
        print(f"last grad_norm: {float(trainer.callback_metrics['grad_norm']):.4f}")


if __name__ == "__main__":
    main()
