"""The learning-rate finder: ``Tuner.lr_find`` and the ``LearningRateFinder`` callback."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule, Tuner
from ember.callbacks import Callback, LearningRateFinder
from ember.trainer import LRFinder

matplotlib.use("Agg")


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1)


def _loader(batch_size: int = 8) -> DataLoader:
    return DataLoader(_data(), batch_size=batch_size, shuffle=True)


class Net(TrainModule):
    """Dropout (RNG), a shuffled loader, momentum, a warm-up then step schedule and a torchmetrics
    mean: every kind of state a search could leave changed."""

    def __init__(self, lr: float = 0.01, dropout: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.mean_loss = torchmetrics.MeanMetric()
        self.step_lrs: list[float] = []  # the learning rate of each optimizer step
        self.step_losses: list[float] = []  # the loss of each training batch
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.step_losses.append(loss.item())
        self.mean_loss(loss)
        self.log("mean_loss", self.mean_loss, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step_lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=3)
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[3])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Quadratic(TrainModule):
    """Loss w² with plain SGD: it shrinks for lr < 1 and diverges above."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.lr = 1e-3

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.w**2 + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CountBatches(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    options = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "enable_checkpointing": False, "max_epochs": 2, **kwargs}  # fmt: skip
    return Trainer(default_root_dir=str(root), **options)


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# -- the search --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "accumulate"), [("exponential", 1), ("linear", 2)])
def test_the_learning_rates_follow_the_formula_across_epochs(
    tmp_path: Path, mode: str, accumulate: int
) -> None:
    module = Net()
    trainer = _trainer(tmp_path, accumulate_grad_batches=accumulate)
    steps = 20  # 8 batches an epoch: the search crosses epochs
    finder = Tuner(trainer).lr_find(module, _loader(), min_lr=1e-4, max_lr=0.5, num_training=steps, mode=mode,
                                    early_stop_threshold=None, update_attr=False)  # fmt: skip
    assert finder is not None
    k = np.arange(steps)
    expected = (
        1e-4 * (0.5 / 1e-4) ** (k / (steps - 1))
        if mode == "exponential"
        else 1e-4 + (0.5 - 1e-4) * k / (steps - 1)
    )
    np.testing.assert_allclose(finder.results["lr"], expected, rtol=1e-12)
    assert finder.results["lr"][0] == 1e-4 and math.isclose(finder.results["lr"][-1], 0.5)
    assert module.step_lrs == finder.results["lr"]  # what each optimizer step used
    assert len(finder.results["loss"]) == steps
    assert len(module.step_losses) == steps * accumulate
    # Lightning's smoothing (beta 0.98) with the bias correction of step i (from 0): 1 - beta^(i + 1),
    # of the loss of the batch that completed each accumulation window, as on_train_batch_end's outputs
    # give it: divided by the accumulation (Lightning's finder reads outputs["loss"] too).
    window_ends = [loss / accumulate for loss in module.step_losses[accumulate - 1 :: accumulate]]
    average, smoothed = 0.0, []
    for i, loss in enumerate(window_ends):
        average = 0.98 * average + 0.02 * loss
        smoothed.append(average / (1 - 0.98 ** (i + 1)))
    np.testing.assert_allclose(finder.results["loss"], smoothed, rtol=1e-6)


def test_the_search_stops_when_the_loss_diverges(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(16, 1)), batch_size=2)
    finder = Tuner(_trainer(tmp_path)).lr_find(Quadratic(), loader, min_lr=1e-3, max_lr=100.0, num_training=60,
                                               update_attr=False)  # fmt: skip
    assert finder is not None
    losses = finder.results["loss"]
    assert 10 < len(losses) < 60 and len(finder.results["lr"]) == len(losses)
    assert losses[-1] > 4.0 * min(losses[:-1])  # the step that crossed 4 x the best ends it
    assert all(loss <= 4.0 * min(losses[: i + 1]) for i, loss in enumerate(losses[:-1]))
    never = Tuner(_trainer(tmp_path)).lr_find(Quadratic(), loader, min_lr=1e-3, max_lr=100.0, num_training=60,
                                              early_stop_threshold=None, update_attr=False)  # fmt: skip
    assert never is not None and len(never.results["loss"]) == 60


class SkipsSomeSteps(Quadratic):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch_idx in (1, 5) else super().training_step(batch, batch_idx)


def test_a_step_whose_training_step_returned_none_records_nan_and_the_search_goes_on(tmp_path: Path) -> None:
    # As Lightning 2.6.6 (_LRCallback): NaN for the step, left out of the smoothed loss and of the
    # divergence check, and out of the suggestion; the step is one of num_training.
    loader = DataLoader(TensorDataset(torch.zeros(32, 1)), batch_size=2)
    finder = Tuner(_trainer(tmp_path)).lr_find(SkipsSomeSteps(), loader, min_lr=1e-3, max_lr=0.1, num_training=12,
                                               update_attr=False)  # fmt: skip
    assert finder is not None
    losses = finder.results["loss"]
    assert len(losses) == len(finder.results["lr"]) == 12
    assert [i for i, loss in enumerate(losses) if math.isnan(loss)] == [1, 5]
    reference = Tuner(_trainer(tmp_path)).lr_find(Quadratic(), loader, min_lr=1e-3, max_lr=0.1, num_training=12,
                                                  update_attr=False)  # fmt: skip
    assert reference is not None
    assert losses[0] == reference.results["loss"][0] and finder.suggestion(skip_begin=0) is not None


# -- the result ---------------------------------------------------------------------------------------
def _synthetic() -> LRFinder:
    finder = LRFinder("linear", 1.0, 20.0, 20)
    lrs = [float(k + 1) for k in range(20)]
    losses = [5.0] * 12 + [3.0] + [0.0] * 7  # the steepest fall is at index 12
    losses[15] = math.nan
    finder.results = {"lr": lrs, "loss": losses}
    return finder


def test_the_suggestion_is_the_steepest_descent_of_the_loss() -> None:
    finder = _synthetic()
    assert finder.suggestion() == 13.0  # skip_begin=10, skip_end=1: index 12
    # Lightning's rule, computed another way: numpy's gradient over the kept finite points.
    kept = [i for i in range(10, 19) if math.isfinite(finder.results["loss"][i])]
    gradient = np.gradient([finder.results["loss"][i] for i in kept], [finder.results["lr"][i] for i in kept])
    assert finder.results["lr"][kept[int(np.argmin(gradient))]] == 13.0
    assert finder.suggestion(skip_begin=13, skip_end=0) == 14.0  # after the fall: the NaN is left out
    with pytest.warns(UserWarning, match="fewer than 2 finite losses"):
        assert finder.suggestion(skip_begin=18) is None
    with pytest.raises(ValueError, match=r"suggestion\(skip_end=-1\)"):
        finder.suggestion(skip_end=-1)


def test_plot_draws_the_curve_and_the_suggestion() -> None:
    from matplotlib.figure import Figure

    finder = _synthetic()
    figure = finder.plot(suggest=True)
    assert isinstance(figure, Figure)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and list(lines[1].get_xdata()) == [13.0]  # the curve, the red dot
    axes = Figure().subplots()
    assert finder.plot(ax=axes) is axes.figure and axes.get_xscale() == "linear"
    finder.mode = "exponential"
    assert finder.plot().axes[0].get_xscale() == "log"


# -- what it leaves: nothing but the learning rate ------------------------------------------------------
def test_fit_after_lr_find_is_bit_identical_to_a_fit_without_it(tmp_path: Path) -> None:
    def run(search: bool, root: Path) -> tuple[list[torch.Tensor], CountBatches, Trainer]:
        torch.manual_seed(0)
        module, counter = Net(), CountBatches()
        trainer = _trainer(root, callbacks=[counter], logger=True, enable_checkpointing=True)
        loader = _loader()
        if search:
            Tuner(trainer).lr_find(module, loader, num_training=12, update_attr=False)
            assert not root.exists()  # no checkpoint, no log, no scratch files
        trainer.fit(module, loader)
        return _weights(module), counter, trainer

    searched, counter, trainer = run(True, tmp_path / "a")
    plain, plain_counter, plain_trainer = run(False, tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(searched, plain, strict=True))
    assert counter.batches == plain_counter.batches == 16  # the callbacks saw none of the search
    assert trainer.global_step == plain_trainer.global_step == 16
    assert trainer.callback_metrics.keys() == plain_trainer.callback_metrics.keys()
    assert torch.equal(trainer.callback_metrics["mean_loss"], plain_trainer.callback_metrics["mean_loss"])
    logs = [(tmp_path / d / "logs" / "version_0" / "metrics.csv").read_text() for d in ("a", "b")]
    assert logs[0] == logs[1]  # the search logged nothing and claimed no version
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["epoch=1-step=16"]


def test_the_callback_searches_at_fit_start_and_the_fit_trains_with_the_suggestion(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, counter = Net(lr=0.5), CountBatches()
    finder = LearningRateFinder(min_lr=1e-4, max_lr=0.1, num_training_steps=15, early_stop_threshold=None)
    trainer = _trainer(tmp_path, callbacks=[finder, counter])
    trainer.fit(module, _loader())
    assert finder.optimal_lr is not None and len(finder.optimal_lr.results["lr"]) == 15
    suggested = finder.optimal_lr.suggestion()
    assert suggested is not None and module.lr == suggested != 0.5
    assert module.steps_run == 15 + 16 and counter.batches == 16 and trainer.global_step == 16
    # The same fit given that rate from the start, with no search: the same weights, bit for bit
    # (the optimizer and the warm-up schedule took the rate as configure_optimizers gives them).
    torch.manual_seed(0)
    plain = Net(lr=suggested)
    _trainer(tmp_path).fit(plain, _loader())
    assert all(torch.equal(a, b) for a, b in zip(_weights(module), _weights(plain), strict=True))
    assert module.step_lrs[15:] == plain.step_lrs


def test_a_resumed_fit_does_not_search_again(tmp_path: Path) -> None:
    finder = LearningRateFinder(num_training_steps=12, update_attr=False)
    first = _trainer(tmp_path, callbacks=[finder], enable_checkpointing=True, max_epochs=1)
    first.fit(Net(), _loader())
    assert finder.optimal_lr is not None and first.checkpoint_callback is not None
    module, again = Net(), LearningRateFinder(num_training_steps=12, update_attr=False)
    trainer = _trainer(tmp_path, callbacks=[again], enable_checkpointing=True, max_epochs=2)
    trainer.fit(module, _loader(), ckpt_path=first.checkpoint_callback.best_model_path)
    assert module.steps_run == 8  # the second epoch's batches: no search
    assert again.optimal_lr is not None and again.optimal_lr.results == finder.optimal_lr.results  # saved


def test_manual_optimization_searches_through_the_module_s_own_steps(tmp_path: Path) -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            optimizer, scheduler = self.optimizers(), self.lr_schedulers()
            loss = F.mse_loss(self.net(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            scheduler.step()  # its own schedule: the search sets the rate of each step over it
            return loss

    module = Manual()
    finder = Tuner(_trainer(tmp_path)).lr_find(module, _loader(), num_training=15, early_stop_threshold=None)
    assert finder is not None and module.step_lrs == finder.results["lr"]
    assert finder.results["lr"] == [1e-8 * (1e8) ** (k / 14) for k in range(15)]
    assert all(math.isfinite(loss) for loss in finder.results["loss"])
    assert module.lr == finder.suggestion()


def test_update_attr_writes_the_rate_where_the_module_keeps_it(tmp_path: Path) -> None:
    class Named(Net):
        def __init__(self, learning_rate: float = 0.01, my_lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.learning_rate = learning_rate
            del self.lr

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)

    torch.manual_seed(0)
    module = Named()
    finder = Tuner(_trainer(tmp_path)).lr_find(module, _loader(), num_training=15)
    assert finder is not None
    suggested = finder.suggestion()
    assert suggested is not None
    assert module.learning_rate == module.hparams.learning_rate == suggested  # attribute and hparams
    torch.manual_seed(0)
    module = Named()
    del module.learning_rate  # in hparams only
    Tuner(_trainer(tmp_path)).lr_find(module, _loader(), num_training=15, attr_name="my_lr")
    assert module.hparams.my_lr == suggested and module.hparams.learning_rate == 0.01


def test_a_missing_attribute_is_named_before_any_step(tmp_path: Path) -> None:
    class Fixed(Net):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Fixed()
    with pytest.raises(AttributeError, match=r"'step_size'.*attr_name"):
        Tuner(_trainer(tmp_path)).lr_find(module, _loader(), attr_name="step_size")
    del module.lr
    with pytest.raises(AttributeError, match=r"'lr' or 'learning_rate'"):
        Tuner(_trainer(tmp_path)).lr_find(module, _loader())
    assert module.steps_run == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"mode": "cosine"},
            r"lr_find\(mode='cosine'\) is not valid. Valid choices: 'exponential', 'linear'",
        ),
        ({"min_lr": 0.1, "max_lr": 0.01}, r"lr_find\(min_lr=0.1, max_lr=0.01\): min_lr must be below max_lr"),
        ({"min_lr": 0.0}, r"lr_find\(min_lr=0.0\) must be a finite number > 0"),
        ({"num_training": 0}, r"lr_find\(num_training=0\) must be an int >= 1"),
        ({"early_stop_threshold": -1.0}, r"lr_find\(early_stop_threshold=-1.0\)"),
    ],
)
def test_bad_arguments_raise_before_any_step(tmp_path: Path, arguments: dict[str, Any], message: str) -> None:
    module = Net()
    with pytest.raises(ValueError, match=message):
        Tuner(_trainer(tmp_path)).lr_find(module, _loader(), **arguments)
    assert module.steps_run == 0
    callback_message = message.replace("lr_find", "LearningRateFinder").replace(
        "num_training", "num_training_steps"
    )
    arguments = {("num_training_steps" if k == "num_training" else k): v for k, v in arguments.items()}
    with pytest.raises(ValueError, match=callback_message):
        LearningRateFinder(**arguments)


def test_several_optimizers_are_refused_before_any_step(tmp_path: Path) -> None:
    class Two(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self) -> Any:
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[3].parameters(), lr=0.1),
            ]

    module = Two()
    with pytest.raises(
        ValueError, match="lr_find works with one optimizer, and configure_optimizers.. returned 2"
    ):
        Tuner(_trainer(tmp_path)).lr_find(module, _loader())
    assert module.steps_run == 0


def test_fast_dev_run_does_not_search(tmp_path: Path) -> None:
    module = Net()
    with pytest.warns(UserWarning, match="fast_dev_run"):
        assert Tuner(_trainer(tmp_path, fast_dev_run=True)).lr_find(module, _loader()) is None
    assert module.steps_run == 0 and module.lr == 0.01


# -- two processes ------------------------------------------------------------------------------------
def _ddp_worker(root: str) -> dict[str, Any]:
    """On each of 2 processes: a search, then a fit; and a fit without a search."""
    results: dict[str, Any] = {}
    for search in (True, False):
        torch.manual_seed(0)
        module = Net(lr=0.05, dropout=0.0)  # (dropout would draw other masks than one process's)
        trainer = _trainer(Path(root), strategy="ddp")
        if search:
            finder = Tuner(trainer).lr_find(module, _loader(batch_size=4), num_training=12, update_attr=False)
            assert finder is not None
            results.update(finder.results, suggestion=finder.suggestion(skip_begin=2))
        trainer.fit(module, _loader(batch_size=4))
        results["weights" if search else "plain"] = [p.flatten().tolist() for p in _weights(module)]
    return results


def test_two_processes_search_the_same_rates_and_agree(tmp_path: Path) -> None:
    ranks = run_processes(_ddp_worker, str(tmp_path))
    assert ranks[0] == ranks[1]  # the rates, the losses, the suggestion: bit for bit on both
    assert ranks[0]["weights"] == ranks[0]["plain"]  # the search left the fit as it was
    assert not any(p.name.startswith(".lr_find") for p in tmp_path.iterdir())
    # The loss of a step is averaged over the processes: one process with their two batches of 4
    # (a batch of 8) sees the same losses.
    torch.manual_seed(0)
    module = Net(lr=0.05, dropout=0.0)
    single = Tuner(_trainer(tmp_path)).lr_find(
        module, _loader(batch_size=8), num_training=12, update_attr=False
    )
    assert single is not None
    assert single.results["lr"] == ranks[0]["lr"]
    np.testing.assert_allclose(single.results["loss"], ranks[0]["loss"], rtol=1e-5)


class SkipsEveryStep(Quadratic):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int:
        # (a training_step returning None would not do: its batch is a step, as Lightning's)
        self.batches += 1
        return -1  # the epoch ends before its first batch: no optimizer step, in every epoch


@pytest.mark.timeout(60)
def test_a_search_that_takes_no_step_ends_after_one_epoch(tmp_path: Path) -> None:
    module = SkipsEveryStep()
    loader = DataLoader(TensorDataset(torch.zeros(6, 1)), batch_size=2)
    trainer = _trainer(tmp_path)
    finder = Tuner(trainer).lr_find(module, loader, num_training=50, update_attr=False)
    assert finder is not None and finder.results["lr"] == [] and finder.suggestion() is None
    assert module.batches == 1  # one epoch, not 50 steps' worth of epochs
    assert trainer.global_step == 0 and module.w.item() == 1.0


def test_the_trainers_callbacks_after_the_tuner_are_those_before_it(tmp_path: Path) -> None:
    counter = CountBatches()
    trainer = _trainer(tmp_path, callbacks=[counter])
    before = list(trainer.callbacks)
    Tuner(trainer).lr_find(Net(), _loader(), num_training=4, update_attr=False)
    assert trainer.callbacks == before  # the finder is gone, not only from the next stage's
    assert not any(isinstance(c, LearningRateFinder) for c in trainer.callbacks)
