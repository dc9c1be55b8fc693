"""Log a Trainer run to Weights & Biases without an account or a network: W&B's offline mode.

    python examples/wandb_offline.py                        # 5 epochs, about 10 seconds
    python examples/wandb_offline.py --max-epochs 1         # CI
    wandb sync runs/wandb_offline/wandb/offline-run-*       # upload the offline run later
    WANDB_MODE=online python examples/wandb_offline.py      # log online instead (after `wandb login`)

The W&B run gets the module's hyper-parameters (``run.config``), every logged metric plotted
against the Trainer's global step (``trainer/global_step``) and, with ``--log-model``, the best
checkpoint as a ``model`` artifact. A TensorBoardLogger and the CSVLogger write the same rows
beside it: ``tensorboard --logdir runs/wandb_offline/tensorboard``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import CSVLogger, TensorBoardLogger, Trainer, TrainModule, WandbLogger
from ember.callbacks import ModelCheckpoint


def blobs(n: int, seed: int) -> TensorDataset:
    """Three Gaussian blobs in 8 dimensions (generated: nothing is downloaded)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 2
    return TensorDataset(centers[labels] + torch.randn(n, 8, generator=g), labels)


class Classifier(TrainModule):
    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()  # -> run.config in W&B, hparams.json, TensorBoard's HParams tab
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--root", default="runs/wandb_offline", help="logs, W&B runs and checkpoints go here")
    parser.add_argument("--project", default="ember-examples")
    parser.add_argument("--log-model", action="store_true", help="upload the best checkpoint as an artifact")
    args = parser.parse_args()
    # Offline unless the user chose a mode: the run is written under <root>/wandb/ for `wandb sync`.
    os.environ.setdefault("WANDB_MODE", "offline")

    torch.manual_seed(0)
    wandb_logger = WandbLogger(project=args.project, save_dir=args.root, log_model=args.log_model)
    trainer = Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=args.root,
        log_every_n_steps=5,
        logger=[wandb_logger, TensorBoardLogger(args.root), CSVLogger(args.root)],
        callbacks=[ModelCheckpoint(monitor="val_acc", mode="max")],
        enable_progress_bar=False,
    )
    trainer.fit(
        Classifier(),
        DataLoader(blobs(512, seed=1), batch_size=32, shuffle=True),
        DataLoader(blobs(128, seed=2), batch_size=128),
    )
    if trainer.is_global_zero:
        print(f"val_acc: {trainer.callback_metrics['val_acc']:.3f}")
        print(f"W&B run {wandb_logger.version} ({os.environ['WANDB_MODE']}): {wandb_logger.log_dir}")
        if os.environ["WANDB_MODE"] == "offline":
            print(f"upload it with: wandb sync {wandb_logger.log_dir}")
        print(f"TensorBoard: tensorboard --logdir {Path(args.root) / 'tensorboard'}")


if __name__ == "__main__":
    main()
