"""The built-in callbacks driven through their hooks by a stand-in Trainer (one process, CPU)."""

from __future__ import annotations

import io
import math
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from dist_helpers import PYTHON, base_env, run_command, run_processes
from rich.console import Console
from torch import nn

from ember import Accelerator
from ember.callbacks.lr_monitor import LearningRateMonitor
from ember.callbacks.model_summary import ModelSummary, summarize, summarize_totals
from ember.callbacks.progress import RichProgressBar
from ember.callbacks.throughput import ThroughputMonitor
from ember.callbacks.timer import Timer
from ember.strategies.environment import running_in_ci


class _Trainer(SimpleNamespace):
    """The part of the Trainer contract the callbacks use. Counts reads of ``progress_bar_metrics``."""

    def __init__(self, **overrides: Any) -> None:
        defaults: dict[str, Any] = {
            "accelerator": Accelerator(cpu=True),
            "global_step": 0,
            "current_epoch": 0,
            "global_rank": 0,
            "world_size": 1,
            "is_global_zero": True,
            "should_stop": False,
            "max_epochs": 1,
            "max_steps": -1,
            "num_training_batches": 5,
            "num_val_batches": [3],
            "total_batch_idx": 0,
            "logs_this_batch": False,  # the Trainer's answer: set by each test, batch by batch
            "log_every_n_steps": 2,
            "callback_metrics": {},
            "optimizers": [],
            "lr_scheduler_configs": [],
            "loggers": [SimpleNamespace(version="")],  # a logger (without a version: no v_num shown)
            "sanity_checking": False,
            "stage": "fit",
            "module": None,
            "log_dir": None,
            "metrics": {"loss": 0.5},
            "metric_reads": 0,
            "logged": [],
        }
        super().__init__(**{**defaults, **overrides})

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        self.metric_reads += 1
        return dict(self.metrics)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


class _Clock:
    """A settable stand-in for time.monotonic / time.perf_counter."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_MODULE: Any = nn.Linear(1, 1)  # hooks receive the module; these callbacks (but ModelSummary) ignore it


# -- environment ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("false", False), ("0", False), ("true", True), ("1", True), ("yes", True)],
)
def test_running_in_ci_reads_the_ci_variable(value: str | None, expected: bool) -> None:
    assert running_in_ci({} if value is None else {"CI": value}) is expected


# -- Timer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("00:01:02:03", 3723),
        ("01:00:00:00", 86400),
        (timedelta(minutes=5), 300),
        ({"hours": 1, "minutes": 30}, 5400),
        (None, None),
    ],
)
def test_timer_accepts_duration_forms(duration: Any, seconds: int | None) -> None:
    timer = Timer(duration)
    assert (timer.duration.total_seconds() if timer.duration else None) == seconds


@pytest.mark.parametrize("bad", ["1:00:00", "aa:00:00:00", "00:00:-1:00", {"hourz": 1}, 30, timedelta(-1)])
def test_timer_rejects_bad_durations_with_the_accepted_forms(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"duration=.*DD:HH:MM:SS.*timedelta.*dict") as info:
        Timer(bad)
    assert repr(bad) in str(info.value)


def test_timer_rejects_unknown_interval() -> None:
    with pytest.raises(ValueError, match=r"interval='batch'.*'step', 'epoch'"):
        Timer(interval="batch")
    with pytest.raises(ValueError, match="'train', 'validate', 'test', 'predict'"):
        Timer().time_elapsed("fit")


def test_timer_stops_training_once_the_duration_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    timer, trainer = Timer({"seconds": 2}), _Trainer()
    assert timer.start_time("train") is None and timer.time_elapsed() == 0.0
    timer.on_train_start(trainer, _MODULE)
    clock.now += 1.5
    timer.on_train_batch_end(trainer, _MODULE, None, None, 0)
    assert trainer.should_stop is False
    assert timer.time_elapsed("train") == pytest.approx(1.5)
    assert timer.time_remaining("train") == pytest.approx(0.5)
    clock.now += 0.5
    timer.on_train_batch_end(trainer, _MODULE, None, None, 1)
    assert trainer.should_stop is True
    timer.on_train_end(trainer, _MODULE)
    assert timer.end_time("train") == clock.now
    clock.now += 100  # the stage ended: its clock stopped
    assert timer.time_elapsed("train") == pytest.approx(2.0)
    assert Timer().time_remaining() is None


def test_timer_epoch_interval_checks_only_at_epoch_end(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    timer, trainer = Timer("00:00:00:01", interval="epoch"), _Trainer()
    timer.on_train_start(trainer, _MODULE)
    clock.now += 5
    timer.on_train_batch_end(trainer, _MODULE, None, None, 0)
    assert trainer.should_stop is False
    timer.on_train_epoch_end(trainer, _MODULE)
    assert trainer.should_stop is True


def test_timer_measures_each_stage_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    timer, trainer = Timer(), _Trainer()
    timer.on_train_start(trainer, _MODULE)
    clock.now += 3
    timer.on_validation_start(trainer, _MODULE)
    clock.now += 1
    timer.on_validation_end(trainer, _MODULE)
    timer.on_train_end(trainer, _MODULE)
    timer.on_test_start(trainer, _MODULE)
    clock.now += 7
    assert timer.time_elapsed("train") == pytest.approx(4)  # validation inside fit counts as training
    assert timer.time_elapsed("validate") == pytest.approx(1)
    assert timer.time_elapsed("test") == pytest.approx(7)  # still running
    assert timer.time_elapsed("predict") == 0.0


def test_timer_state_continues_the_clock_after_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    first, trainer = Timer({"seconds": 50}), _Trainer()
    first.on_train_start(trainer, _MODULE)
    clock.now += 30
    state = first.state_dict()
    assert state["time_elapsed"]["train"] == pytest.approx(30)

    resumed, trainer = Timer({"seconds": 50}), _Trainer()
    resumed.load_state_dict(state)
    assert resumed.time_elapsed("train") == pytest.approx(30)
    resumed.on_train_start(trainer, _MODULE)
    clock.now += 15
    resumed.on_train_batch_end(trainer, _MODULE, None, None, 0)
    assert resumed.time_elapsed("train") == pytest.approx(45) and not trainer.should_stop
    clock.now += 5
    resumed.on_train_batch_end(trainer, _MODULE, None, None, 1)
    assert trainer.should_stop


def _timer_rank_worker(expired_rank: int) -> dict[str, Any]:
    """Both ranks run a 5 s Timer; only ``expired_rank`` has (by its restored state) used it up."""
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    trainer = _Trainer(accelerator=accelerator, world_size=2, global_rank=rank, is_global_zero=rank == 0)
    timer = Timer({"seconds": 5})
    timer.load_state_dict({"time_elapsed": {"train": 10.0 if rank == expired_rank else 0.0}})
    timer.on_train_start(trainer, _MODULE)
    timer.on_train_batch_end(trainer, _MODULE, None, None, 0)
    return {"should_stop": trainer.should_stop}


def test_timer_follows_rank_zero_on_two_processes() -> None:
    assert run_processes(_timer_rank_worker, 0, nprocs=2) == [{"should_stop": True}] * 2
    assert run_processes(_timer_rank_worker, 1, nprocs=2) == [{"should_stop": False}] * 2


# -- LearningRateMonitor ----------------------------------------------------------------------------
def _params(n: int = 1) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(2)) for _ in range(n)]


def _run_steps(monitor: LearningRateMonitor, trainer: _Trainer, batches: int) -> None:
    monitor.on_train_start(trainer, _MODULE)
    monitor.on_train_epoch_start(trainer, _MODULE)
    for i in range(batches):
        trainer.total_batch_idx, trainer.global_step = i, i
        trainer.logs_this_batch = (i + 1) % trainer.log_every_n_steps == 0
        monitor.on_train_batch_start(trainer, _MODULE, None, i)


def test_lr_monitor_names_and_values() -> None:
    sgd = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    grouped = torch.optim.SGD([{"params": _params()}, {"params": _params(), "lr": 0.01}], lr=0.2)
    adams = [torch.optim.Adam(_params(), lr=1e-3, betas=(0.8, 0.99)), torch.optim.Adam(_params(), lr=2e-3)]
    named = torch.optim.AdamW([{"params": _params(), "name": "backbone"}, {"params": _params()}], lr=0.5)

    def logged(optimizers: list[torch.optim.Optimizer], log_momentum: bool = False) -> dict[str, float]:
        trainer = _Trainer(optimizers=optimizers)
        _run_steps(LearningRateMonitor(log_momentum=log_momentum), trainer, 1)
        assert trainer.logged[0][0] == 0
        return trainer.logged[0][1]

    assert logged([sgd]) == {"lr-SGD": pytest.approx(0.1)}
    assert logged([sgd], log_momentum=True) == {"lr-SGD": 0.1, "lr-SGD-momentum": 0.9}
    # Lightning's names: groups counted from 1, the second optimizer of a class "-1".
    assert logged([grouped]) == {"lr-SGD/pg1": 0.2, "lr-SGD/pg2": 0.01}
    assert logged(adams, log_momentum=True) == {
        "lr-Adam": 1e-3,
        "lr-Adam-momentum": 0.8,
        "lr-Adam-1": 2e-3,
        "lr-Adam-1-momentum": 0.9,
    }
    assert logged([named, sgd]) == {"lr-AdamW/backbone": 0.5, "lr-AdamW/pg2": 0.5, "lr-SGD": 0.1}


def test_lr_monitor_logs_every_n_batches_and_follows_the_scheduler() -> None:
    optimizer = torch.optim.SGD(_params(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = _Trainer(optimizers=[optimizer], log_every_n_steps=2)
    monitor = LearningRateMonitor("step")
    monitor.on_train_start(trainer, _MODULE)
    for i in range(5):
        trainer.total_batch_idx = trainer.global_step = i
        trainer.logs_this_batch = (i + 1) % trainer.log_every_n_steps == 0
        monitor.on_train_batch_start(trainer, _MODULE, None, i)
        optimizer.step()
        scheduler.step()
        trainer.global_step = i + 1
        monitor.on_train_batch_end(trainer, _MODULE, None, None, i)
    # Sampled before the batches after which the Trainer writes a row (the 2nd, the 4th), as
    # Lightning's; written after them, with the step of that row.
    assert trainer.logged == [(2, {"lr-SGD": 0.5}), (4, {"lr-SGD": 0.125})]


def test_lr_monitor_epoch_interval_logs_at_epoch_start_only() -> None:
    trainer = _Trainer(optimizers=[torch.optim.SGD(_params(), lr=0.3)], global_step=7)
    _run_steps(LearningRateMonitor("epoch"), trainer, 4)
    assert trainer.logged == [(7, {"lr-SGD": 0.3})]


def test_lr_monitor_needs_a_logger_and_a_known_interval() -> None:
    with pytest.raises(RuntimeError, match="LearningRateMonitor needs a logger"):
        LearningRateMonitor().on_train_start(_Trainer(loggers=[]), _MODULE)
    with pytest.raises(ValueError, match=r"logging_interval='batch'.*None, 'step', 'epoch'"):
        LearningRateMonitor("batch")


def test_lr_monitor_logs_only_on_rank_zero() -> None:
    trainer = _Trainer(optimizers=[torch.optim.SGD(_params(), lr=0.3)], is_global_zero=False, global_rank=1)
    _run_steps(LearningRateMonitor(), trainer, 3)
    assert trainer.logged == []


# -- ModelSummary -----------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)


def test_summarize_counts_parameters_per_submodule() -> None:
    net = _Net()
    net.norm.requires_grad_(False)
    net.head.eval()
    rows = summarize(net, max_depth=1)
    assert [(r.name, r.type) for r in rows] == [
        ("encoder", "Sequential"),
        ("head", "Linear"),
        ("norm", "LayerNorm"),
    ]
    for row in rows:
        submodule = net.get_submodule(row.name)
        assert row.params == sum(p.numel() for p in submodule.parameters())
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters()) == 145
    assert {r.name: (r.trainable, r.mode) for r in rows} == {
        "encoder": (112, "train"),
        "head": (27, "eval"),
        "norm": (0, "train"),
    }

    deep = summarize(net, max_depth=2)
    assert [r.name for r in deep] == ["encoder", "encoder.0", "encoder.1", "encoder.2", "head", "norm"]
    assert summarize(net, max_depth=-1) == deep and summarize(net, max_depth=0) == []
    with pytest.raises(ValueError, match="max_depth"):
        summarize(net, max_depth=-2)


def test_summarize_totals_counts_shared_parameters_once_and_sizes_by_dtype() -> None:
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    totals = summarize_totals(tied)
    assert totals.total == sum(p.numel() for p in tied.parameters()) == 16 + 4 + 4
    half = nn.Linear(10, 10).half()
    half.bias.requires_grad_(False)
    totals = summarize_totals(half)
    assert (totals.trainable, totals.non_trainable, totals.total) == (100, 10, 110)
    assert totals.size_mb == pytest.approx(110 * 2 / 1e6)


_PIPED_FIT = """
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset
import ember

class Net(ember.TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
trainer = ember.Trainer(max_epochs=1, default_root_dir=sys.argv[1], enable_checkpointing=False)
trainer.fit(Net(), DataLoader(data, batch_size=2))
print("rich imported before the fit ended:", "rich" in sys.modules and "rich.progress" in sys.modules)
"""


def test_output_to_a_pipe_is_plain_text_and_needs_no_rich(tmp_path: Any) -> None:
    # Standard output is a pipe here, as in a log file or a batch job: the model summary is plain
    # text, the progress bar prints plain lines, and rich's modules are not even imported for them.
    done = run_command([PYTHON, "-c", _PIPED_FIT, str(tmp_path)], env=base_env(CI=""))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert (
        "Name   Type    Params  Trainable  Mode" in out
        and "0  layer  Linear       3          3  train" in out
    )
    assert "3  Total params" in out and "epoch 0  step 4/4" in out
    assert "rich imported before the fit ended: False" in out
    before_end = out.split("Run summary")[0]  # RunSummary draws its table with rich once the fit ended
    assert "\u2501" not in before_end and "\u2503" not in before_end  # no box drawing


def test_model_summary_prints_on_rank_zero_only(capsys: pytest.CaptureFixture[str]) -> None:
    ModelSummary(max_depth=1).on_fit_start(_Trainer(), _Net())
    out = capsys.readouterr().out
    for text in ("encoder", "Sequential", "LayerNorm", "Total params", "Trainable params", "145"):
        assert text in out
    ModelSummary().on_fit_start(_Trainer(is_global_zero=False), _Net())
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="max_depth"):
        ModelSummary(max_depth=-5)


# -- ThroughputMonitor ------------------------------------------------------------------------------
def test_throughput_from_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    batch = torch.zeros(4, 8)  # 4 samples of 8 items
    monitor = ThroughputMonitor(batch_size_fn=len, length_fn=lambda b: b.numel(), window_size=2)
    trainer = _Trainer(world_size=2, log_every_n_steps=2)
    monitor.on_train_start(trainer, _MODULE)
    for i, seconds in enumerate([0.5, 0.5, 1.5, 0.5]):
        trainer.global_step = i
        monitor.on_train_batch_start(trainer, _MODULE, batch, i)
        clock.now += seconds
        trainer.total_batch_idx = trainer.global_step = i + 1
        trainer.logs_this_batch = (i + 1) % trainer.log_every_n_steps == 0
        monitor.on_train_batch_end(trainer, _MODULE, None, batch, i)
    (step_a, first), (step_b, second) = trainer.logged
    assert (step_a, step_b) == (2, 4)  # the step of the Trainer's row (Lightning's + 1)
    # Rates over the last 2 updates (batch 2 ended 0.5 s after batch 1): this process, and the
    # job of 2 processes.
    assert first == pytest.approx(
        {
            "train/time": 1.0,
            "train/batches": 2,
            "train/samples": 8,
            "train/lengths": 64,
            "train/device/batches_per_sec": 2.0,
            "train/device/samples_per_sec": 8.0,
            "train/device/items_per_sec": 64.0,
            "train/batches_per_sec": 4.0,
            "train/samples_per_sec": 16.0,
            "train/items_per_sec": 128.0,
            "epoch": 0.0,
        }
    )
    # window_size=2: only batches 3-4 (0.5 s apart) count.
    assert second["train/device/samples_per_sec"] == pytest.approx(4 / 0.5)
    assert second["train/time"] == pytest.approx(3.0)


def test_throughput_rank_and_argument_checks() -> None:
    monitor = ThroughputMonitor(batch_size_fn=lambda b: 1)
    trainer = _Trainer(is_global_zero=False, global_rank=1, log_every_n_steps=1, logs_this_batch=True)
    monitor.on_train_start(trainer, _MODULE)
    monitor.on_train_batch_end(trainer, _MODULE, None, None, 0)
    assert trainer.logged == []
    assert ThroughputMonitor(batch_size_fn=len).compute() == {}
    with pytest.raises(ValueError, match="window_size"):
        ThroughputMonitor(batch_size_fn=len, window_size=0)
    with pytest.raises(TypeError, match="batch_size_fn"):
        ThroughputMonitor(batch_size_fn=3)  # type: ignore[arg-type]


# -- RichProgressBar --------------------------------------------------------------------------------
def _run_epoch(bar: RichProgressBar, trainer: _Trainer, batches: int, validate: bool = False) -> None:
    bar.setup(trainer, _MODULE, "fit")
    bar.on_train_start(trainer, _MODULE)
    bar.on_train_epoch_start(trainer, _MODULE)
    for i in range(batches):
        bar.on_train_batch_start(trainer, _MODULE, None, i)
        bar.on_train_batch_end(trainer, _MODULE, None, None, i)
    if validate:
        bar.on_validation_start(trainer, _MODULE)
        for i in range(sum(trainer.num_val_batches)):
            bar.on_validation_batch_end(trainer, _MODULE, None, None, i)
        bar.on_validation_end(trainer, _MODULE)
    bar.on_train_epoch_end(trainer, _MODULE)
    bar.on_train_end(trainer, _MODULE)
    bar.teardown(trainer, _MODULE, "fit")


def test_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _Trainer(num_training_batches=5, metrics={"loss": 0.43121, "acc": 1234567.0})
    _run_epoch(RichProgressBar(plain_every_n_batches=2, console=Console(file=io.StringIO())), trainer, 5)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        ["epoch 0", "step 2/5"],
        ["epoch 0", "step 4/5"],
        ["epoch 0", "step 5/5"],  # the epoch-end line
    ]
    assert all(line.split("  ")[2].endswith(" it/s") for line in lines)
    assert lines[0].endswith("loss=0.4312  acc=1.235e+06")
    assert trainer.metric_reads == 3  # metrics are read only for the lines printed

    # When the last batch falls on the period, the epoch-end line replaces the periodic one.
    trainer.num_training_batches = 4
    _run_epoch(RichProgressBar(plain_every_n_batches=2, console=Console(file=io.StringIO())), trainer, 4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[1] for line in lines] == ["step 2/4", "step 4/4"]


def test_plain_lines_under_ci_even_in_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    terminal = io.StringIO()
    trainer = _Trainer(num_training_batches=math.inf)
    bar = RichProgressBar(plain_every_n_batches=3, console=Console(file=terminal, force_terminal=True))
    _run_epoch(bar, trainer, 4, validate=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [["epoch 0", "step 3/?"], ["epoch 0", "step 4/?"]]
    assert terminal.getvalue() == ""


def test_standalone_validation_prints_its_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _Trainer(num_val_batches=[2, 1], metrics={"val_loss": 0.25})
    bar = RichProgressBar(console=Console(file=io.StringIO()))
    bar.setup(trainer, _MODULE, "validate")
    bar.on_validation_start(trainer, _MODULE)
    for i in range(3):
        bar.on_validation_batch_end(trainer, _MODULE, None, None, i)
    bar.on_validation_end(trainer, _MODULE)
    assert capsys.readouterr().out.startswith("validation  step 3/3  ")


def test_rich_bar_in_a_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    terminal = io.StringIO()
    trainer = _Trainer(num_training_batches=6, metrics={"loss": 0.125})
    bar = RichProgressBar(refresh_rate=3, console=Console(file=terminal, force_terminal=True, width=150))
    _run_epoch(bar, trainer, 6, validate=True)
    drawn = terminal.getvalue()
    assert "Epoch 0" in drawn and "6/6" in drawn and "loss=0.1250" in drawn and "it/s" in drawn
    assert "Validation" in drawn
    assert capsys.readouterr().out == ""
    assert trainer.metric_reads == 3  # batches 3 and 6, and the epoch end


def test_progress_bar_is_silent_off_rank_zero_and_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    for bar, trainer in [
        (RichProgressBar(plain_every_n_batches=1), _Trainer(is_global_zero=False, global_rank=1)),
        (RichProgressBar(refresh_rate=0, plain_every_n_batches=1), _Trainer()),
    ]:
        _run_epoch(bar, trainer, 5)
        assert trainer.metric_reads == 0
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="refresh_rate"):
        RichProgressBar(refresh_rate=-1)
    with pytest.raises(ValueError, match="plain_every_n_batches"):
        RichProgressBar(plain_every_n_batches=0)
