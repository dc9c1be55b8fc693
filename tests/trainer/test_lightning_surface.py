"""Lightning 2.6's ``LightningModule`` and ``Trainer`` names that a migrated project uses, checked
against what Lightning does with them: ``self.log``'s positional order, ``metric_attribute`` and
``logger=None``; ``to_torchscript`` of a manual-optimization module; ``on_gpu``;
``load_from_checkpoint(hparams_file=..., weights_only=...)``; the deprecated
``configure_sharded_model``; and the Trainer's settings read back under Lightning's names."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader as _loader

from ember import Trainer, TrainModule


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)  # fmt: skip
    return Trainer(**{**settings, **kwargs})


class Net(TrainModule):
    def __init__(self, lr: float = 0.1, width: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0]).sum(1, keepdim=True), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


# -- the module -------------------------------------------------------------------------------------------
class Logs(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("positional", 1.0, True)  # Lightning's third argument: prog_bar
        self.log("default_logger", 2.0, logger=None)  # Lightning's default: to the loggers
        self.log("attribute", 3.0, metric_attribute="attribute")
        self.log_dict(
            {"d": 4.0}, False, None, True, False, "max"
        )  # prog_bar, logger, on_step, on_epoch, reduce_fx
        return super().training_step(batch, batch_idx)


def test_log_takes_lightnings_positional_order_and_options(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(Logs(), _loader())
    assert trainer.progress_bar_metrics == {"positional": 1.0}
    assert trainer.logged_metrics == {"positional": 1.0, "default_logger": 2.0, "attribute": 3.0, "d": 4.0}


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # (an instance attribute, as Lightning's examples set it)
        self.strict_loading = False


def test_to_torchscript_of_a_module_that_set_its_lightning_flags(tmp_path: Path) -> None:
    module = Manual()
    x = torch.randn(2, 3)
    scripted = module.to_torchscript()
    assert torch.equal(scripted(x), module(x))
    traced = module.to_torchscript(method="trace", example_inputs=x)
    assert torch.equal(traced(x), module(x))


def test_on_gpu_is_whether_the_module_is_on_cuda() -> None:
    assert Net().on_gpu is False


class Sharded(Net):
    def configure_sharded_model(self) -> None:
        self.extra = torch.nn.Linear(1, 1)


def test_configure_sharded_model_is_refused_with_its_new_name(tmp_path: Path) -> None:
    # Lightning 2.6 still calls the deprecated hook: ember, which calls only configure_model, says so
    # rather than training a module whose layers were never built.
    with pytest.raises(TypeError, match="Sharded.configure_sharded_model.*rename it configure_model"):
        _trainer(tmp_path).fit(Sharded(), _loader())


def test_load_from_checkpoint_hparams_file_and_weights_only(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True)
    trainer.fit(Net(lr=0.1, width=2), _loader())
    path = trainer.checkpoint_callback.best_model_path
    (tmp_path / "hparams.yaml").write_text("lr: 0.5\nwidth: 2\n")
    (tmp_path / "hparams.json").write_text(json.dumps({"lr": 0.25, "width": 2}))
    # As Lightning: the file's hyper-parameters replace the checkpoint's, and kwargs override both.
    assert Net.load_from_checkpoint(path, hparams_file=tmp_path / "hparams.yaml").hparams.lr == 0.5
    assert Net.load_from_checkpoint(path, hparams_file=str(tmp_path / "hparams.json")).hparams.lr == 0.25
    loaded = Net.load_from_checkpoint(
        path, hparams_file=tmp_path / "hparams.yaml", lr=0.75, weights_only=True
    )
    assert loaded.hparams.lr == 0.75 and loaded.hparams.width == 2
    assert torch.equal(loaded.layer.weight, trainer.module.layer.weight)
    (tmp_path / "hparams.txt").write_text("lr: 0.5\n")
    with pytest.raises(ValueError, match=r"hparams_file=.*hparams.txt.*'\.yaml', '\.yml' or '\.json'"):
        Net.load_from_checkpoint(path, hparams_file=tmp_path / "hparams.txt")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="hparams_file=.*list.yaml.*a mapping"):
        Net.load_from_checkpoint(path, hparams_file=tmp_path / "list.yaml")


# -- the Trainer ------------------------------------------------------------------------------------------
def test_trainer_settings_under_lightnings_names(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path, overfit_batches=2, reload_dataloaders_every_n_epochs=3, enable_autolog_hparams=False
    )
    assert (trainer.overfit_batches, trainer.reload_dataloaders_every_n_epochs) == (2, 3)
    assert trainer.enable_autolog_hparams is False
    assert trainer.val_check_batch is None  # (Lightning's too, before a fit)
    assert trainer.distributed_sampler_kwargs is None  # one process (Lightning's single-device strategy)
    trainer = _trainer(tmp_path, val_check_interval=0.5)
    trainer.fit(Net(), _loader(), _loader())
    assert trainer.val_check_batch == 2  # half of the 4 batches
    trainer = _trainer(tmp_path, val_check_interval=timedelta(hours=1))
    trainer.fit(Net(), _loader(), _loader())
    assert trainer.val_check_batch is None  # time-based: no batch count
