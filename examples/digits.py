"""Classify scikit-learn's 8x8 digits (shipped inside scikit-learn: nothing is downloaded).

    python examples/digits.py                                   # one process
    ember launch --nproc-per-node 2 examples/digits.py          # DDP on 2 processes (make demo)
    python examples/digits.py --devices 2                       # the Trainer starts the 2nd process itself
    python examples/digits.py --resume last                     # continue from the last checkpoint

A TrainModule with a torchmetrics accuracy, a DataModule, ModelCheckpoint and EarlyStopping.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from ember import DataModule, Trainer, TrainModule
from ember.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint


class Digits(DataModule):
    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels))
        self.train, self.val, self.test = random_split(
            data, [0.7, 0.15, 0.15], torch.Generator().manual_seed(0)
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.test, batch_size=256)


class Classifier(TrainModule):
    def __init__(self, hidden: int = 128, lr: float = 3e-3, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)  # torchmetrics syncs it across processes

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--root", default="runs/digits", help="logs and checkpoints go here")
    parser.add_argument("--resume", default=None, help="a checkpoint directory, or 'last'")
    args = parser.parse_args()

    torch.manual_seed(0)
    trainer = Trainer(
        max_epochs=args.epochs,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        default_root_dir=args.root,
        log_every_n_steps=10,
        callbacks=[
            ModelCheckpoint(
                monitor="val_acc", mode="max", save_top_k=2, save_last=True, filename="{epoch}-{val_acc:.3f}"
            ),
            EarlyStopping(monitor="val_loss", patience=4),
            LearningRateMonitor(),
        ],
    )
    model, data = Classifier(), Digits()
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    results = trainer.test(datamodule=data, ckpt_path="best")
    if trainer.is_global_zero:
        print(f"best checkpoint: {trainer.checkpoint_callback.best_model_path}")
        print(f"test accuracy of the best checkpoint: {results[0]['test_acc']:.3f}")
        print(f"metrics: {trainer.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
