"""save_hyperparameters across an __init__ chain, single container arguments, hparams_initial, and the
DataModule's hyper-parameters and trainer (Lightning's behaviour)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ember import DataModule, Trainer, TrainModule


def _loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)), batch_size=4
    )


def _fit(module: TrainModule, tmp_path: Path, datamodule: DataModule | None = None) -> tuple[Trainer, Path]:
    trainer = Trainer(
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    if datamodule is None:
        trainer.fit(module, _loader())
    else:
        trainer.fit(module, datamodule=datamodule)
    assert trainer.checkpoint_callback is not None
    return trainer, Path(trainer.checkpoint_callback.best_model_path)


class Net(TrainModule):
    def __init__(self, lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Wide(Net):  # does not call save_hyperparameters itself
    def __init__(self, width: int = 3, lr: float = 0.02) -> None:
        super().__init__(lr=lr)
        self.width = width


# -- the __init__ chain ----------------------------------------------------------------------------------
def test_a_parent_saving_sees_the_subclass_arguments_and_reload_rebuilds_them(tmp_path: Path) -> None:
    module = Wide(width=7, lr=0.05)
    assert module.hparams == {"lr": 0.05, "width": 7}  # the subclass's lr wins over the default 0.02
    _, path = _fit(module, tmp_path)
    loaded = Wide.load_from_checkpoint(path)
    assert loaded.width == 7 and loaded.hparams == {"lr": 0.05, "width": 7}
    assert torch.equal(loaded.layer.weight, module.layer.weight)


def test_kwargs_contents_are_kept_and_star_args_left_out() -> None:
    class Base(TrainModule):
        def __init__(self, lr: float = 1.0, *args: Any, k: int = 2, **kwargs: Any) -> None:
            super().__init__()
            self.save_hyperparameters()

    class Derived(Base):
        def __init__(self, w: int = 1, *rest: Any, **options: Any) -> None:
            super().__init__(5, 6, 7, k=3, z=9)

    assert Net(lr=0.3, foo=1, bar="x").hparams == {"lr": 0.3, "foo": 1, "bar": "x"}
    assert Derived(4, 8, extra=8).hparams == {"lr": 5, "k": 3, "z": 9, "w": 4, "extra": 8}


def test_the_chain_stops_at_another_object_and_passes_over_helper_methods() -> None:
    class Inner(TrainModule):
        def __init__(self, depth: int = 1) -> None:
            super().__init__()
            self._save()

        def _save(self, unused: int = 0) -> None:  # a helper of __init__: its own arguments are not saved
            self.save_hyperparameters()

    class Outer(TrainModule):
        def __init__(self, lr: float = 0.1, depth: int = 5) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.inner = Inner(depth=depth + 1)

    outer = Outer()
    assert outer.hparams == {"lr": 0.1, "depth": 5}
    assert outer.inner.hparams == {"depth": 6}  # not the outer module's arguments


def _save_for(config_version: int, module: TrainModule) -> None:  # a plain function, not a method
    module.save_hyperparameters()


def test_a_parent_saving_through_a_function_records_the_subclass_init_arguments() -> None:
    class Base(TrainModule):
        def __init__(self, hidden: int = 3) -> None:
            super().__init__()
            _save_for(2, self)  # Lightning walks up to the __init__ chain: not this function's arguments

    class Model2(Base):
        def __init__(self, depth: int, lr: float) -> None:
            super().__init__()

    assert Model2(2, 0.1).hparams == {"hidden": 3, "depth": 2, "lr": 0.1}

    class BaseData(DataModule):
        def __init__(self, batch_size: int = 3) -> None:
            super().__init__()
            _save_for(2, self)

    class Data(BaseData):
        def __init__(self, root: str, batch_size: int = 4) -> None:
            super().__init__(batch_size)

    assert Data("r").hparams == {"batch_size": 4, "root": "r"}


def test_names_and_ignore_across_the_chain() -> None:
    class Backboned(Net):
        def __init__(self, lr: float = 0.1, hidden: int = 4, backbone: Any = None, **kwargs: Any) -> None:
            super().__init__(lr, **kwargs)  # Net saved everything, backbone included
            self.save_hyperparameters(ignore="backbone")

    module = Backboned(hidden=8, backbone=torch.nn.Linear(2, 2), extra=1)
    assert module.hparams == {"lr": 0.1, "hidden": 8, "extra": 1}  # a subclass's ignore drops it

    class Picky(Net):
        def __init__(self, lr: float = 0.1, hidden: int = 4) -> None:
            super().__init__(lr)
            self.hparams.clear()
            self.save_hyperparameters("hidden")
            with pytest.raises(
                ValueError, match=r"\['nope'\] are not __init__ arguments of Picky .*'hidden'"
            ):
                self.save_hyperparameters("nope")

    assert Picky(hidden=2).hparams == {"hidden": 2}


# -- a single container argument ------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    lr: float = 0.1
    hidden: int = 4


class FromDict(Net):
    def __init__(self, cfg: dict[str, Any]) -> None:
        TrainModule.__init__(self)
        self.save_hyperparameters(cfg)
        self.layer = torch.nn.Linear(3, 1)
        self.cfg = cfg


class FromNamespace(FromDict):
    def __init__(self, cfg: argparse.Namespace, **kwargs: Any) -> None:
        super().__init__(cfg)


class FromDataclass(FromDict):
    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg or Config())


class FromUnannotatedDataclass(FromDict):
    def __init__(self, cfg) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg)


@pytest.mark.parametrize(
    ("cls", "cfg", "kind"),
    [
        (FromDict, {"lr": 0.03, "hidden": 2}, "dict"),
        (FromNamespace, argparse.Namespace(lr=0.03, hidden=2), "namespace"),
        (FromDataclass, Config(lr=0.03, hidden=2), "dataclass"),
    ],
)
def test_a_container_argument_is_stored_flat_and_passed_back_on_load(
    tmp_path: Path, cls: type[FromDict], cfg: Any, kind: str
) -> None:
    module = cls(cfg)
    assert module.hparams == {"lr": 0.03, "hidden": 2} and module.hparams.lr == 0.03
    _, path = _fit(module, tmp_path)
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["hyper_parameters"] == {"lr": 0.03, "hidden": 2}
    assert (state["hparams_name"], state["hparams_type"]) == ("cfg", kind)
    loaded = cls.load_from_checkpoint(path)
    assert type(loaded.cfg) is type(cfg) and loaded.cfg == cfg
    assert loaded.hparams == module.hparams and torch.equal(loaded.layer.weight, module.layer.weight)
    assert cls.load_from_checkpoint(path, cfg=cfg).hparams.lr == 0.03  # an argument given wins


def test_a_dataclass_argument_without_annotation_cannot_be_rebuilt(tmp_path: Path) -> None:
    _, path = _fit(FromUnannotatedDataclass(Config()), tmp_path)
    with pytest.raises(TypeError, match=r"dataclass argument 'cfg' .* annotate it .*or pass cfg=\.\.\."):
        FromUnannotatedDataclass.load_from_checkpoint(path)
    assert FromUnannotatedDataclass.load_from_checkpoint(path, cfg=Config()).hparams.hidden == 4


# -- hparams_initial and the DataModule -------------------------------------------------------------------
def test_hparams_initial_is_a_copy_of_what_was_saved() -> None:
    module = Net(lr=0.5, layers=[1, 2])
    module.hparams.lr = 0.9
    module.hparams.layers.append(3)
    assert module.hparams_initial == {"lr": 0.5, "layers": [1, 2]}
    module.hparams_initial["lr"] = 1.0  # a fresh copy each time
    assert module.hparams_initial.lr == 0.5
    assert TrainModule().hparams_initial == {} and TrainModule().hparams == {}


class Batches(DataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(_loader().dataset, batch_size=self.hparams.batch_size)


def test_a_datamodule_saves_hyperparameters_and_knows_its_trainer(tmp_path: Path) -> None:
    datamodule = Batches(batch_size=2)
    assert datamodule.hparams == {"batch_size": 2} and datamodule.hparams.batch_size == 2
    assert datamodule.hparams_initial == {"batch_size": 2}
    assert datamodule.trainer is None
    trainer, _ = _fit(Net(), tmp_path, datamodule)
    assert datamodule.trainer is trainer and trainer.num_training_batches == 4


# -- what the loggers get (Lightning's _log_hyperparams) ---------------------------------------------------
class Quiet(Net):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)


def _logged(
    module: TrainModule,
    tmp_path: Path,
    datamodule: DataModule | None,
    stage: str = "fit",
    autolog: bool = True,
) -> list[Any]:
    from ember.trainer.loggers import Logger

    class Seen(Logger):
        name, version = "seen", 0

        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        def log_hyperparams(self, params: Any) -> None:
            self.calls.append(dict(params))

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            pass

    seen = Seen()
    trainer = Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=seen,
                      enable_checkpointing=False, default_root_dir=tmp_path, enable_autolog_hparams=autolog)  # fmt: skip
    loaders = (
        {}
        if datamodule is not None
        else {"train_dataloaders" if stage == "fit" else "dataloaders": _loader()}
    )
    getattr(trainer, stage)(module, datamodule=datamodule, **loaders)
    return seen.calls


def test_the_loggers_get_the_module_and_datamodule_hyperparameters_at_every_stage(tmp_path: Path) -> None:
    assert _logged(Net(), tmp_path, Batches(batch_size=2)) == [{"lr": 0.01, "batch_size": 2}]
    assert _logged(Quiet(), tmp_path, Batches(batch_size=2)) == [{"batch_size": 2}]  # logger=False
    assert _logged(Quiet(), tmp_path, None) == []  # nothing to log: no call, as Lightning
    assert _logged(Net(lr=0.5), tmp_path, None, stage="validate") == [{"lr": 0.5}]
    assert _logged(Net(), tmp_path, Batches(), autolog=False) == []  # Trainer(enable_autolog_hparams=False)

    class Clash(Batches):
        def __init__(self, lr: float = 0.3) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(RuntimeError, match=r"hyper-parameter 'lr' is 0.01 in Net and 0.3 in Clash"):
        _logged(Net(), tmp_path, Clash())
    with pytest.raises(TypeError, match=r"save_hyperparameters\(logger='no'\): expected True or False"):
        Net().save_hyperparameters(logger="no")  # type: ignore[arg-type]
