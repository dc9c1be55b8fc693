"""The fit loop's stop conditions and limits, checked against what Lightning 2.6 does in the same
scenario (the expected traces below were recorded by running the scenario with Lightning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from small_fit import random_loader as _loader
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


class Traced(TrainModule):
    """Records the training and validation batches it runs and the epoch hooks; ``stop_at``: sets
    ``trainer.should_stop`` in ``on_train_batch_end`` once ``global_step`` reaches it, ``stop_epoch``:
    in ``on_train_epoch_start`` of that epoch."""

    def __init__(self, stop_at: int | None = None, stop_epoch: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.stop_at, self.stop_epoch = stop_at, stop_epoch
        self.trace: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.trace.append(("train", self.trainer.current_epoch, batch_idx))
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.trace.append(("val", self.trainer.current_epoch, batch_idx))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.trace.append(("test", batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_start(self) -> None:
        self.trace.append("on_train_start")

    def on_train_epoch_start(self) -> None:
        self.trace.append(("on_train_epoch_start", self.trainer.current_epoch))
        if self.trainer.current_epoch == self.stop_epoch:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        self.trace.append(("on_train_epoch_end", self.trainer.current_epoch))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stop_at is not None and self.trainer.global_step >= self.stop_at:
            self.trainer.should_stop = True

    def on_test_start(self) -> None:
        self.trace.append("on_test_start")


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    settings = dict(enable_progress_bar=False, enable_model_summary=False, logger=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)  # fmt: skip
    return Trainer(**{**settings, **kwargs})


def _epoch(epoch: int, batches: int, validates: bool = True) -> list[Any]:
    return [
        ("on_train_epoch_start", epoch),
        *[("train", epoch, i) for i in range(batches)],
        *([("val", epoch, 0), ("val", epoch, 1)] if validates else []),
        ("on_train_epoch_end", epoch),
    ]


@pytest.mark.parametrize("limit", [0, 0.0])
def test_no_training_batches_trains_nothing(tmp_path: Path, limit: int | float) -> None:
    # Lightning: the sanity check runs, then the fit loop is skipped (no on_train_start, no epochs).
    module = Traced()
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=limit, num_sanity_val_steps=2)
    trainer.fit(module, _loader(), _loader(8))
    assert module.trace == [("val", 0, 0), ("val", 0, 1)]
    assert (trainer.current_epoch, trainer.global_step) == (0, 0)


def test_should_stop_in_on_train_epoch_start_runs_no_batch(tmp_path: Path) -> None:
    # Lightning checks should_stop before each batch: the epoch ends at once, with its end hooks.
    module = Traced(stop_epoch=1)
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2)
    trainer.fit(module, _loader(), _loader(8))
    assert module.trace == [
        "on_train_start", *_epoch(0, 2), ("on_train_epoch_start", 1), ("on_train_epoch_end", 1)
    ]  # fmt: skip
    assert (trainer.current_epoch, trainer.global_step) == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # stopped inside epoch 0 after its 2nd batch: Lightning validates after that batch
        ({"stop_at": 2}, ["on_train_start", *_epoch(0, 2)]),
        # asked at every batch, allowed once min_steps=6 is reached (epoch 1, 2nd batch)
        ({"stop_at": 1, "min_steps": 6}, ["on_train_start", *_epoch(0, 4), *_epoch(1, 2)]),
        # a validation due after that batch by val_check_interval runs once, not twice
        ({"stop_at": 2, "val_check_interval": 2}, ["on_train_start", *_epoch(0, 2)]),
        # counted across epochs (check_val_every_n_epoch=None): validated after batch 3, and at the stop
        (
            {"stop_at": 5, "val_check_interval": 3, "check_val_every_n_epoch": None},
            [
                "on_train_start",
                ("on_train_epoch_start", 0),
                ("train", 0, 0),
                ("train", 0, 1),
                ("train", 0, 2),
                ("val", 0, 0),
                ("val", 0, 1),
                ("train", 0, 3),
                ("on_train_epoch_end", 0),
                *_epoch(1, 1),
            ],
        ),
        # an epoch that does not validate (check_val_every_n_epoch=2) still does not
        ({"stop_at": 2, "check_val_every_n_epoch": 2}, ["on_train_start", *_epoch(0, 2, validates=False)]),
    ],
)
def test_should_stop_inside_an_epoch_validates_as_lightning(
    tmp_path: Path, kwargs: dict[str, Any], expected: list[Any]
) -> None:
    module = Traced(stop_at=kwargs.pop("stop_at"))
    trainer = _trainer(tmp_path, max_epochs=4, **kwargs)
    trainer.fit(module, _loader(), _loader(8))
    assert module.trace == expected


def test_max_steps_inside_an_epoch_still_skips_the_epoch_end_validation(tmp_path: Path) -> None:
    module = Traced()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _loader(), _loader(8))
    assert module.trace == ["on_train_start", *_epoch(0, 2, validates=False)]


@pytest.mark.parametrize("limit", [0, 0.0])
def test_evaluation_with_no_batches_runs_nothing(
    tmp_path: Path, limit: int | float, capsys: pytest.CaptureFixture[str]
) -> None:
    # Lightning: the evaluation loop is skipped (no hooks) and test()/validate() return [].
    module = Traced()
    trainer = _trainer(tmp_path, limit_test_batches=limit, limit_val_batches=limit)
    assert trainer.test(module, _loader(8), verbose=False) == []
    assert trainer.validate(module, _loader(8)) == []
    assert module.trace == []
    assert capsys.readouterr().out == ""  # (verbose: no empty table either)


class _Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter(_loader().dataset)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # Lightning: "When using an IterableDataset, Trainer(limit_train_batches) must be 1.0 or an int"
        ({"limit_train_batches": 0.5}, "limit_train_batches=0.5 is a fraction of the batches"),
        # Lightning: "You requested to check 0.1 of the val_dataloader but 0.1 * 2 < 1"
        ({"limit_val_batches": 0.1}, r"limit_val_batches=0.1 of 2 batches is less than one batch"),
    ],
)
def test_a_fraction_that_cannot_be_taken_raises(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    trainer = _trainer(tmp_path, max_epochs=1, **kwargs)
    train = DataLoader(_Stream(), batch_size=4) if "limit_train_batches" in kwargs else _loader()
    with pytest.raises(ValueError, match=message):
        trainer.fit(Traced(), train, _loader(8))
    trainer = _trainer(tmp_path, limit_test_batches=0.1, limit_predict_batches=0.5)
    with pytest.raises(ValueError, match=r"limit_test_batches=0.1 of 2 batches"):
        trainer.test(Traced(), _loader(8), verbose=False)
    with pytest.raises(ValueError, match="limit_predict_batches=0.5 is a fraction"):
        trainer.predict(Traced(), DataLoader(_Stream(), batch_size=4))
    # what stays valid: 1.0, 0.0 and ints on a stream; a fraction that keeps a batch
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1.0, limit_val_batches=0.5)
    trainer.fit(Traced(), DataLoader(_Stream(), batch_size=4), _loader(8))
    assert (trainer.global_step, trainer.num_val_batches) == (4, [1])


@pytest.mark.parametrize(
    ("mode", "values", "stops_after"), [("max", [1.0, 0.95, 0.9, 0.7], 4), ("min", [1.0, 1.05, 1.1, 1.3], 4)]
)
def test_early_stopping_keeps_the_sign_of_min_delta(mode: str, values: list[float], stops_after: int) -> None:
    # Lightning keeps min_delta's sign: a negative one lets a value up to |min_delta| worse count as an
    # improvement (here every step but the last is within 0.1 of the previous best).
    from ember.callbacks import EarlyStopping

    stopper = EarlyStopping("m", mode=mode, patience=1, min_delta=-0.1)
    decisions = [stopper._decide(value) for value in values]
    assert [bool(reason) for reason in decisions] == [False] * (stops_after - 1) + [True]
    assert stopper.best_score == values[-2]


@pytest.mark.parametrize(("mode", "past"), [("min", 0.4), ("max", 0.6)])
def test_early_stopping_stops_past_the_stopping_threshold_not_at_it(mode: str, past: float) -> None:
    # Lightning compares with the mode's strict operator: a value equal to the threshold goes on.
    from ember.callbacks import EarlyStopping

    stopper = EarlyStopping("m", mode=mode, patience=10, stopping_threshold=0.5)
    assert stopper._decide(0.5) == ""
    assert "reached stopping_threshold=0.5" in stopper._decide(past)


def test_evaluation_and_prediction_take_a_dict_of_loaders_as_lightning(tmp_path: Path) -> None:
    from ember import TrainModule

    class Module(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.log("size", float(batch[0].shape[0]))

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            return dataloader_idx

    def loader(n: int) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.ones(n, 4)), batch_size=n)

    trainer = _trainer(tmp_path)
    results = trainer.validate(Module(), {"small": loader(2), "large": loader(3)}, verbose=False)
    assert results == [{"size/dataloader_idx_0": 2.0}, {"size/dataloader_idx_1": 3.0}]  # the dict's order
    assert trainer.predict(Module(), {"a": loader(2), "b": loader(3)}) == [[0], [1]]


def test_an_optimizer_that_needs_a_closure_runs_the_step_inside_it(tmp_path: Path) -> None:
    # LBFGS under automatic optimization (Lightning's): training_step and backward run in the closure
    # the optimizer evaluates, each evaluation with that point's gradients alone.
    from ember import TrainModule

    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [2.0], [3.0]])

    def lbfgs(params: Any) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(params, lr=0.5, max_iter=5)

    class Module(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.layer = torch.nn.Linear(3, 1)
            self.calls = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.calls += 1
            return F.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return lbfgs(self.parameters())

    module = Module()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    torch.manual_seed(1)
    plain = torch.nn.Linear(3, 1)
    optimizer = lbfgs(plain.parameters())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.mse_loss(plain(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    assert trainer.global_step == 2 and module.calls == 10  # five evaluations a step, as Lightning
    for ours, reference in zip(module.layer.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours, reference)
