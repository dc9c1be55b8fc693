"""A small regression task and a quiet Trainer, shared by the callback tests that train a few epochs
(``test_swa.py``, ``test_finetuning.py``) and by their 2-process workers; ``random_loader``, the
random data of the tests that only need a fit to run; ``LinearRegression``, the module those tests
subclass for the hooks they watch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback


class LinearRegression(TrainModule):
    """``Linear(3, 1)`` fitted to the batch's target with the mean squared error and SGD (lr 0.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_data(n: int = 16) -> TensorDataset:
    """``n`` samples of 3 features, a smooth target plus a little noise; the same every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g))


def random_loader(n: int = 16) -> DataLoader:
    """``n`` samples of 3 random features and a random target, in batches of 4; the same every call."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4
    )


def regression_loader(batch_size: int = 4) -> DataLoader:
    return DataLoader(regression_data(), batch_size=batch_size)


def quiet_trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A Trainer without progress bar, model summary, logger and (unless asked) checkpoints."""
    return Trainer(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False, logger=False,
                   callbacks=callbacks, **{"enable_checkpointing": False, **kwargs})  # fmt: skip
