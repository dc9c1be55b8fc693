"""Which logger rows a fit writes, and when, checked against what Lightning 2.6 writes for the same
module: ``self.log(on_step=True)`` in evaluation steps, ``log_every_n_steps`` under gradient
accumulation, and values logged in ``on_train_batch_end``. Lightning's rows are quoted in each
test (its training steps are ember's - 1: docs/how-to/migrate-from-lightning.md)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from logger_fits import RowLogger
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback

Rows = RowLogger


def _loader(n: int) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=1
    )


def _fit(module: TrainModule, rows: Rows, tmp_path: Path, val: Any = None, **kwargs: Any) -> Trainer:
    settings = dict(max_epochs=2, logger=rows, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=str(tmp_path), log_every_n_steps=2)  # fmt: skip
    trainer = Trainer(**{**settings, **kwargs})
    trainer.fit(module, _loader(8), val)
    return trainer


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("t", float(self.global_step))
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("tbe", float(batch_idx))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class EvalSteps(Net):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("vs", float(batch_idx), on_step=True)  # on_epoch: True, the default here
        self.log("vse", float(batch_idx), on_step=True, on_epoch=True, prog_bar=True)
        self.log("only", float(batch_idx), on_step=True, on_epoch=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("ts", float(batch_idx), on_step=True)


def test_on_step_in_validation_step_writes_a_row_per_batch_as_lightning(tmp_path: Path) -> None:
    rows = Rows()
    trainer = _fit(EvalSteps(), rows, tmp_path, _loader(4), limit_train_batches=3, limit_val_batches=2,
                   num_sanity_val_steps=1)  # fmt: skip
    # Lightning (its training steps 1, 3, 5; the validation steps are each run's batches, counted
    # on over the fit, the sanity check not counted):
    # (1, {t: 1, tbe: 1, epoch: 0}), (0, {vs_step: 0, vse_step: 0, only: 0}), (1, {... 1}),
    # (2, {vs_epoch: .5, vse_epoch: .5, epoch: 0}), (3, {t: 3, tbe: 0, epoch: 1}),
    # (5, {t: 5, tbe: 2, epoch: 1}), (2, {... 0}), (3, {... 1}), (5, {vs_epoch: .5, ..., epoch: 1})
    step = lambda i: {"vs_step": i, "vse_step": i, "only": i}  # noqa: E731
    epoch_end = {"vs_epoch": 0.5, "vse_epoch": 0.5}
    assert [(s, r) for s, r in rows.rows if "t" not in r] == [
        (0, step(0.0)), (1, step(1.0)), (3, {**epoch_end, "epoch": 0.0}),
        (2, step(0.0)), (3, step(1.0)), (6, {**epoch_end, "epoch": 1.0}),
    ]  # fmt: skip
    # Step values of evaluation go to the loggers and the progress bar, not to callback_metrics.
    assert sorted(trainer.callback_metrics) == ["t", "tbe", "vs", "vs_epoch", "vse", "vse_epoch"]
    assert trainer.progress_bar_metrics == {"vse_step": 1.0, "vse_epoch": 0.5}
    assert sorted(trainer.logged_metrics) == [
        "only",
        "t",
        "tbe",
        "vs_epoch",
        "vs_step",
        "vse_epoch",
        "vse_step",
    ]
    # trainer.test: the steps start again at 0.
    rows.rows.clear()
    trainer.test(trainer.module, _loader(2))
    assert rows.rows == [(0, {"ts_step": 0.0}), (1, {"ts_step": 1.0}), (6, {"ts_epoch": 0.5, "epoch": 2.0})]


def test_on_step_in_validation_step_with_several_loaders(tmp_path: Path) -> None:
    rows = Rows()
    _fit(EvalSteps(), rows, tmp_path, [_loader(4), _loader(4)], max_epochs=1, limit_train_batches=3,
         limit_val_batches=2, num_sanity_val_steps=0)  # fmt: skip
    # Lightning: the loader's suffix after the _step / _epoch suffix, each loader its own steps.
    name = lambda n, i: f"{n}/dataloader_idx_{i}"  # noqa: E731
    step = lambda v, i: {name("vs_step", i): v, name("vse_step", i): v, name("only", i): v}  # noqa: E731
    assert [(s, r) for s, r in rows.rows if "t" not in r] == [
        (0, step(0.0, 0)), (1, step(1.0, 0)), (0, step(0.0, 1)), (1, step(1.0, 1)),
        (3, {name(n, i): 0.5 for n in ("vs_epoch", "vse_epoch") for i in (0, 1)} | {"epoch": 0.0}),
    ]  # fmt: skip


@pytest.mark.parametrize("hook", ["on_train_epoch_end", "on_validation_epoch_end", "on_fit_start"])
def test_on_step_outside_the_batches_names_where_it_works(tmp_path: Path, hook: str) -> None:
    class Logs(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    setattr(Logs, hook, lambda self: self.log("x", 1.0, on_step=True))
    with pytest.raises(
        ValueError, match=rf"log\('x', on_step=True\) is not possible in {hook}.*validation_step"
    ):
        _fit(Logs(), Rows(), tmp_path, _loader(2), num_sanity_val_steps=0)


def test_rows_under_gradient_accumulation_follow_the_optimizer_steps(tmp_path: Path) -> None:
    rows = Rows()
    _fit(Net(), rows, tmp_path, limit_train_batches=7, accumulate_grad_batches=2)
    # Lightning: a row every 2nd optimizer step (4 a epoch: the last batch steps), none mid-window:
    # (1, {t: 1, tbe: 3}), (3, {t: 3, tbe: 6}), (5, {t: 5, tbe: 3}), (7, {t: 7, tbe: 6})
    steps = [(s, r["tbe"]) for s, r in rows.rows if "tbe" in r]
    assert steps == [(2, 3.0), (4, 6.0), (6, 3.0), (8, 6.0)]


def test_no_extra_row_at_the_last_batch_of_an_epoch(tmp_path: Path) -> None:
    rows = Rows()
    _fit(Net(), rows, tmp_path, limit_train_batches=3)
    # Lightning: (1, {tbe: 1}), (3, {tbe: 0}), (5, {tbe: 2}); the epoch's last batch gets no row of its own.
    assert [(s, r["tbe"]) for s, r in rows.rows if "tbe" in r] == [(2, 1.0), (4, 0.0), (6, 2.0)]


def test_a_granted_stop_writes_the_row_of_its_batch(tmp_path: Path) -> None:
    class Stops(Callback):
        def on_train_batch_end(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            if trainer.global_step == 3:
                trainer.should_stop = True

    rows = Rows()
    _fit(Net(), rows, tmp_path, limit_train_batches=5, callbacks=[Stops()])
    assert [(s, r["tbe"]) for s, r in rows.rows if "tbe" in r] == [(2, 1.0), (3, 2.0)]


def test_values_logged_in_on_train_batch_end_reach_their_batches_row(tmp_path: Path) -> None:
    class Logs(Callback):
        def on_train_batch_end(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            module.log("from_callback", float(trainer.global_step))

    rows = Rows()
    _fit(Net(), rows, tmp_path, max_epochs=1, limit_train_batches=4, callbacks=[Logs()])
    assert [(s, r.get("tbe"), r.get("from_callback")) for s, r in rows.rows if "t" in r] == [
        (2, 1.0, 2.0),
        (4, 3.0, 4.0),
    ]


def test_logs_this_batch_answers_as_the_rows_are_written(tmp_path: Path) -> None:
    class Asks(Callback):
        def __init__(self) -> None:
            self.answers: list[tuple[int, bool, bool]] = []

        def on_train_batch_start(
            self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
        ) -> None:
            self.start = trainer.logs_this_batch

        def on_train_batch_end(self, trainer: Trainer, module: TrainModule, *args: Any) -> None:
            self.answers.append((trainer.global_step, self.start, trainer.logs_this_batch))

    asks, rows = Asks(), Rows()
    _fit(
        Net(),
        rows,
        tmp_path,
        max_epochs=1,
        limit_train_batches=7,
        accumulate_grad_batches=2,
        callbacks=[asks],
    )
    written = [s for s, r in rows.rows if "t" in r]
    assert written == [2, 4]
    assert [step for step, start, end in asks.answers if start and end] == written
    assert not any(start != end for _, start, end in asks.answers)


def test_step_and_epoch_values_without_the_loader_suffix_stay_in_their_loaders_results(
    tmp_path: Path,
) -> None:
    class Named(Net):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.log(f"x{dataloader_idx}", 1.0, on_step=True, add_dataloader_idx=False)

    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    results = trainer.validate(Named(), [_loader(2), _loader(2)])
    assert results == [{"x0_epoch": 1.0}, {"x1_epoch": 1.0}]


# -- log_every_n_steps above the epoch's batches: Lightning's warning ----------------------------------
@pytest.mark.parametrize(
    ("settings", "warns"),
    [
        ({"log_every_n_steps": 9}, True),  # 8 batches an epoch: no step row in the first epoch
        ({"log_every_n_steps": 8}, False),
        ({"log_every_n_steps": 9, "logger": False}, False),  # (Lightning's: only with a logger)
        ({"log_every_n_steps": 9, "fast_dev_run": 2}, False),  # (a row every step)
    ],
)
def test_fewer_batches_than_log_every_n_steps_warns_once_as_lightning(
    tmp_path: Path, settings: dict[str, Any], warns: bool
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(Net(), Rows(), tmp_path, **{"max_epochs": 2, **settings})
    said = [str(w.message) for w in caught if "log_every_n_steps" in str(w.message)]
    expected = ["the training epoch has 8 batches, fewer than log_every_n_steps=9: an epoch may end without a "
                "logger row of step values; lower log_every_n_steps to see them in each epoch"]  # fmt: skip
    assert said == (expected if warns else [])


# -- trainer.logged_metrics: every value logged with logger=True, as Lightning's -----------------------
class Seen(Net):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("b", float(batch_idx), on_step=True, on_epoch=True)
        self.log("hidden", float(batch_idx), logger=False)
        self.log("d", float(batch_idx), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(dict(self.trainer.logged_metrics))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("v", float(batch_idx), on_step=True)


def test_logged_metrics_hold_the_values_of_batches_without_a_row_as_lightning(tmp_path: Path) -> None:
    module = Seen()
    # Lightning 2.6.6, log_every_n_steps=3 (a row after batches 2 and 5 only), 1 epoch of 8 batches,
    # read in on_train_batch_end: the values of that batch, each batch; at the end the epoch values
    # and the validation's too; "hidden" (logger=False) never.
    trainer = _fit(module, Rows(), tmp_path, max_epochs=1, log_every_n_steps=3, val=_loader(2),
                   num_sanity_val_steps=0)  # fmt: skip
    assert module.seen == [{"t": float(i), "b_step": float(i)} for i in range(8)]
    assert trainer.logged_metrics == {
        "t": 7.0, "b_step": 7.0, "b_epoch": 3.5, "d": 3.5, "v_step": 1.0, "v_epoch": 0.5,
    }  # fmt: skip
    # Without a logger too (Lightning's hold them all the same).
    assert _fit(Seen(), Rows(), tmp_path, max_epochs=1, logger=False).logged_metrics["b_step"] == 7.0
