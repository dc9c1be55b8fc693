"""Train scikit-learn's 8x8 digits from a config file: TrainerCLI, ember's LightningCLI.

    python examples/cli.py fit --config examples/cli.yaml                          # train
    python examples/cli.py fit --config examples/cli.yaml --trainer.max_epochs 3 --model.hidden 64
    python examples/cli.py fit --config examples/cli.yaml --print_config           # the resolved config
    python examples/cli.py fit --config examples/cli.yaml --trainer.devices 2      # 2 processes (DDP)
    python examples/cli.py test --config examples/cli.yaml --ckpt_path runs/cli/checkpoints/last
    python examples/cli.py fit --help                                              # every option

The module has no configure_optimizers: the config's ``optimizer`` and ``lr_scheduler`` build them.
Each run saves its resolved config as ``config.yaml`` next to its metrics (runs/cli/logs/version_N/).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from ember import DataModule, TrainModule
from ember.trainer import TrainerCLI


class Digits(DataModule):
    """scikit-learn's digits (shipped inside it: nothing is downloaded), split 70/15/15."""

    def __init__(self, batch_size: int = 64, split_seed: int = 0) -> None:
        self.batch_size, self.split_seed = batch_size, split_seed

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels))
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train, self.val, self.test = random_split(data, [0.7, 0.15, 0.15], generator)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val, batch_size=256)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.test, batch_size=256)


class Classifier(TrainModule):
    """A two-layer perceptron; ``hidden`` and ``dropout`` are ``--model.hidden`` / ``--model.dropout``."""

    def __init__(self, hidden: int = 128, dropout: float = 0.1) -> None:
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
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy)


if __name__ == "__main__":
    TrainerCLI(Classifier, Digits)
