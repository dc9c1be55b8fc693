"""A DataModule's batch-transfer hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``,
``on_after_batch_transfer``) run as Lightning runs them: the DataModule's, where it overrides one,
in place of the module's (with a warning when both override it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.trainer.module import DataModule


class _Data(DataModule):
    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return [batch[0] * 10]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return [super().on_after_batch_transfer(batch, dataloader_idx)[0] + 1]


class _Model(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(float(batch[0][0]))
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(float(batch[0][0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, module: TrainModule) -> None:
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=_Data())


def test_the_datamodule_s_hooks_move_the_batches(tmp_path: Path) -> None:
    module = _Model()
    _fit(tmp_path, module)
    assert module.seen == [11.0, 11.0, 11.0]  # 2 training batches, 1 validation batch


def test_the_datamodule_s_hook_wins_over_the_module_s_with_a_warning(tmp_path: Path) -> None:
    class Both(_Model):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return [batch[0] * 100]

    module = Both()
    with pytest.warns(UserWarning, match="on_before_batch_transfer.*both"):
        _fit(tmp_path, module)
    assert module.seen == [11.0, 11.0, 11.0]


class _Counting(_Data):
    """Counts the batches it made; its count is its checkpoint state (Lightning's DataModule hooks)."""

    def __init__(self) -> None:
        self.made, self.loaded = 0, None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.made += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"made": self.made}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)


def test_a_checkpoint_holds_the_datamodule_s_state(tmp_path: Path) -> None:
    def trainer(epochs: int) -> Trainer:
        return Trainer(default_root_dir=str(tmp_path), max_epochs=epochs, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip

    first, data = trainer(1), _Counting()
    first.fit(_Model(), datamodule=data)
    first.save_checkpoint(tmp_path / "ckpt")
    assert data.made == 3
    resumed = _Counting()
    trainer(2).fit(_Model(), datamodule=resumed, ckpt_path=tmp_path / "ckpt")
    assert resumed.loaded == {"made": 3}
    assert DataModule().state_dict() == {}  # the default: nothing saved


class _Graph:
    """A batch class of its own with a ``to`` method (as a graph library's batch): moved by calling it."""

    def __init__(self, x: torch.Tensor, moved_to: list[str] | None = None) -> None:
        self.x, self.moved_to = x, moved_to or []

    def to(self, device: torch.device) -> _Graph:
        return _Graph(self.x.to(device), [*self.moved_to, str(device)])


def test_objects_with_a_to_method_are_moved_by_it_as_in_lightning(tmp_path: Path) -> None:
    # Lightning's default transfer_batch_to_device calls .to(device) on any object that has one (in
    # containers too); the batch that reaches training_step is what .to returned.
    seen: list[Any] = []

    class Model(_Model):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.append(batch)
            return self.layer(batch["graph"].x).sum()

    loader = DataLoader([{"graph": _Graph(torch.ones(2, 1))}] * 2, batch_size=None)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Model(), loader)
    assert [batch["graph"].moved_to for batch in seen] == [["cpu"], ["cpu"]]
