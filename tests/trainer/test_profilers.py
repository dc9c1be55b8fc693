"""``Trainer(profiler=...)``: what each profiler reports, where, and that ``None`` adds nothing to
the loops (their resolved calls are the plain ones)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback
from ember.trainer import (
    AdvancedProfiler,
    PassThroughProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
    XLAProfiler,
)
from ember.trainer.profilers.timed import timed
from ember.trainer.step import Epoch, automatic_step, manual_step

STRATEGY = "[Strategy]SingleDeviceStrategy"
HOOKS = ("setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_before_backward",
         "on_validation_batch_end", "on_train_epoch_end", "teardown")  # fmt: skip


class Module(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.calls: Counter[str] = Counter()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("test_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.layer(batch[0])

    def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.calls["on_train_batch_start"] += 1

    def on_after_backward(self) -> None:
        self.calls["on_after_backward"] += 1

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Counting(Callback):
    """Counts its own hook calls, to compare with the profiler's."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        if name in HOOKS:
            calls = object.__getattribute__(self, "calls")
            return lambda *args: calls.update([name])
        return object.__getattribute__(self, name)


def _data(n: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)), batch_size=2
    )


def _trainer(tmp_path: Path, profiler: Any, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = dict(
        max_epochs=2, num_sanity_val_steps=1, limit_val_batches=2, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, non_finite=None,
    )  # fmt: skip
    options.update(kwargs)
    return Trainer(profiler=profiler, **options)


def _rows(report: str) -> dict[str, int]:
    """Action -> number of calls, read from a SimpleProfiler report (the table, not its attributes)."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].isdigit() and cells[0] != "Total":
            rows[cells[0]] = int(cells[2])
    return rows


def test_simple_profiler_counts_every_action(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counting, module = Counting(), Module()
    trainer = _trainer(
        tmp_path, "simple", callbacks=[counting], accumulate_grad_batches=2, limit_train_batches=5
    )
    trainer.fit(module, _data(), _data())
    printed = capsys.readouterr().out
    assert "FIT Profiler Report" in printed
    report = trainer.profiler.summary()
    assert isinstance(trainer.profiler, SimpleProfiler) and report.startswith("FIT Profiler Report")
    rows = _rows(report)
    assert rows == _rows(printed)  # what was printed is the summary
    batches, steps, val = 2 * 5, 2 * 3, 1 + 2 * 2  # 2 epochs of 5 batches, a step every 2 and at the end
    expected = {
        "run_training_epoch": 2,
        "run_training_batch": batches,
        "[_TrainingEpochLoop].train_dataloader_next": batches,
        f"{STRATEGY}.training_step": batches,
        f"{STRATEGY}.backward": batches,
        "[TrainModule]Module.optimizer_step": steps,
        "[TrainModule]Module.optimizer_zero_grad": steps,
        "[_EvaluationLoop].val_next": val,
        f"{STRATEGY}.validation_step": val,
        "[TrainModule]Module.configure_model": 1,
        "[TrainModule]Module.configure_optimizers": 1,
        "[TrainModule]Module.on_train_batch_start": batches,
        "[TrainModule]Module.on_after_backward": batches,
    }
    assert {name: rows.get(name) for name in expected} == expected
    assert module.calls == {"on_train_batch_start": batches, "on_after_backward": batches}
    # Each of the callback's hooks: as many timings as calls, and only the hooks it defines.
    callback_rows = {k.split(".")[-1]: v for k, v in rows.items() if k.startswith("[Callback]Counting.")}
    assert callback_rows == dict(counting.calls) and counting.calls["on_train_batch_end"] == batches
    assert "[TrainModule]Module.on_train_epoch_end" not in rows  # not overridden: not called, not timed


def test_each_stage_has_its_own_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profiler = SimpleProfiler(extended=False)
    trainer = _trainer(tmp_path, profiler, max_epochs=1, limit_test_batches=3, limit_predict_batches=4)
    module = Module()
    trainer.fit(module, _data(), _data())
    trainer.test(module, _data(), verbose=False)
    report = profiler.summary()
    assert report.startswith("TEST Profiler Report") and "Num calls" not in report  # extended=False
    assert "[_EvaluationLoop].test_next" in report and f"{STRATEGY}.test_step" in report
    assert "run_training_batch" not in report  # the fit's actions were the fit's report
    assert profiler.call_counts["[_EvaluationLoop].test_next"] == 3
    trainer.predict(module, _data())
    assert profiler.call_counts["[_PredictionLoop].predict_next"] == 4
    assert profiler.call_counts[f"{STRATEGY}.predict_step"] == 4
    printed = capsys.readouterr().out
    assert [printed.count(f"{s} Profiler Report") for s in ("FIT", "TEST", "PREDICT")] == [1, 1, 1]


def test_simple_profiler_writes_a_file_instead_of_printing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = _trainer(tmp_path, SimpleProfiler(dirpath=tmp_path / "prof", filename="perf"), max_epochs=1)
    trainer.fit(Module(), _data())
    assert "Profiler Report" not in capsys.readouterr().out
    text = (tmp_path / "prof" / "fit-perf.txt").read_text()  # one process: no rank in the name
    assert text.startswith("FIT Profiler Report") and "run_training_batch" in text
    # Without dirpath the file goes to the trainer's log_dir.
    trainer = _trainer(tmp_path / "root", SimpleProfiler(filename="perf"), max_epochs=1)
    trainer.validate(Module(), _data(), verbose=False)
    assert "[_EvaluationLoop].val_next" in (tmp_path / "root" / "validate-perf.txt").read_text()


def test_manual_optimization_and_the_module_hooks_are_profiled(tmp_path: Path) -> None:
    class Manual(Module):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            optimizer = self.optimizers()
            self.manual_backward(F.mse_loss(self.layer(batch[0]), batch[1]))
            optimizer.step()
            optimizer.zero_grad()

        def on_before_batch_transfer(self, batch, dataloader_idx):  # type: ignore[no-untyped-def]
            return batch

    profiler = SimpleProfiler()
    _trainer(tmp_path, profiler, max_epochs=1, limit_train_batches=3).fit(Manual(), _data())
    counts = profiler.call_counts
    assert counts["run_training_batch"] == counts[f"{STRATEGY}.training_step"] == 3
    assert counts[f"{STRATEGY}.backward"] == counts["[TrainModule]Manual.on_after_backward"] == 3
    assert counts["[TrainModule]Manual.on_before_batch_transfer"] == 3


def test_advanced_profiler_reports_pstats_per_action(tmp_path: Path) -> None:
    profiler = AdvancedProfiler(line_count_restriction=10)
    trainer = _trainer(tmp_path, profiler, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer.fit(Module(), _data())
    report = profiler.summary()
    assert out.getvalue().strip() == report.strip()
    assert report.startswith("FIT Profiler Report")
    section = report.split(f"Profile stats for: {STRATEGY}.training_step")[1].split("Profile stats for:")[0]
    assert "function calls" in section and "Ordered by: cumulative time" in section
    assert "(training_step)" in section and "(mse_loss)" in section  # the module's code, seen by cProfile
    assert "Profile stats for: run_training_batch" in report
    assert sys.getprofile() is None  # no cProfile left running
    with pytest.raises(ValueError, match="not running"):
        profiler.stop("never started")


def test_pytorch_profiler_writes_a_trace_and_a_table(tmp_path: Path) -> None:
    profiler = PyTorchProfiler(dirpath=tmp_path, filename="torch", row_limit=50)
    trainer = _trainer(tmp_path, profiler, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0)
    trainer.fit(Module(), _data())
    table = (tmp_path / "fit-torch.txt").read_text()
    assert "Profile stats for: records" in table and "aten::" in table and "CPU total" in table
    assert f"{STRATEGY}.training_step" in table
    trace = tmp_path / "fit-torch.pt.trace.json"
    assert profiler.trace_paths == [str(trace)]
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert f"{STRATEGY}.training_step" in names and f"{STRATEGY}.backward" in names
    assert profiler.summary().rstrip() == table.rstrip()  # still readable after the stage
    assert torch.autograd.profiler._is_profiler_enabled is False  # nothing left recording


def test_pytorch_profiler_with_a_schedule_writes_a_trace_per_window(tmp_path: Path) -> None:
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=2)
    profiler = PyTorchProfiler(dirpath=tmp_path, schedule=schedule)
    trainer = _trainer(tmp_path, profiler, max_epochs=1, num_sanity_val_steps=0, limit_train_batches=6)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer.fit(Module(), _data())
    assert profiler.trace_paths[0] == str(tmp_path / "fit.4.pt.trace.json")  # the first window: steps 3-4
    assert all(Path(path).is_file() for path in profiler.trace_paths) and "aten::" in out.getvalue()


def test_pytorch_profiler_by_name(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "pytorch", max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer.fit(Module(), _data())
    assert isinstance(trainer.profiler, PyTorchProfiler) and "aten::" in out.getvalue()
    assert (tmp_path / "fit.pt.trace.json").is_file()  # no logger: the log_dir is default_root_dir


def test_no_profiler_wraps_nothing(tmp_path: Path) -> None:
    """``profiler=None``: the hooks, the steps and backward that the loops call are the plain ones."""
    trainer = _trainer(tmp_path, None, callbacks=[Counting()], max_epochs=1)
    module = Module()
    trainer.fit(module, _data())
    assert isinstance(trainer.profiler, PassThroughProfiler) and trainer.config.profiler is None
    hooks = trainer._hook_plan.entries(trainer)
    first, own, monitoring, every = hooks["on_train_batch_end"]
    assert [type(h) for h in first] == [functools.partial] and first == every
    assert own is None and monitoring == ()
    own = hooks["on_train_batch_start"][1]
    assert own.__func__ is Module.on_train_batch_start and own.__self__ is module  # the bound method
    assert trainer._backward_pass == trainer.accelerator.backward  # the Accelerator's own method
    epoch = Epoch.of(trainer, validates=False)
    assert epoch.run_batch is automatic_step
    assert epoch.training_step.__func__ is Module.training_step
    assert (epoch.step, epoch.zero_grad) == trainer._step_optimizers[0].boundary_calls()
    assert timed(None, "x", automatic_step) is automatic_step and manual_step is not automatic_step


def test_a_profiler_wraps_the_resolved_calls(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, SimpleProfiler(), callbacks=[Counting()], max_epochs=1)
    module = Module()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(module, _data())
    hooks = trainer._hook_plan.entries(trainer)
    (hook,) = hooks["on_train_batch_end"][3]
    assert (
        hook.action == "[Callback]Counting.on_train_batch_end" and type(hook.__wrapped__) is functools.partial
    )
    assert hooks["on_train_batch_start"][1].__wrapped__.__func__ is Module.on_train_batch_start
    assert trainer._backward_pass.action == f"{STRATEGY}.backward"
    epoch = Epoch.of(trainer, validates=False)
    assert epoch.run_batch.__wrapped__ is automatic_step and epoch.run_batch.action == "run_training_batch"
    assert epoch.step.action == "[TrainModule]Module.optimizer_step"


@pytest.mark.parametrize("value", ["fast", 1, object(), SimpleProfiler])
def test_bad_profiler_argument(value: Any) -> None:
    with pytest.raises(
        ValueError, match=r"profiler=.* Valid choices: None, 'advanced', 'pytorch', 'simple', 'xla'"
    ):
        Trainer(profiler=value)


def test_bad_profiler_options() -> None:
    with pytest.raises(TypeError, match="SimpleProfiler"):
        SimpleProfiler(extended="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="line_count_restriction=0"):
        AdvancedProfiler(line_count_restriction=0)
    with pytest.raises(ValueError, match=r"sort_by_key='fastest'\)\. Valid choices: count"):
        PyTorchProfiler(sort_by_key="fastest")
    with pytest.raises(ValueError, match="record_shape, which torch.profiler.profile does not take"):
        PyTorchProfiler(record_shape=True)
    with pytest.raises(ValueError, match="filename=''"):
        SimpleProfiler(filename="")
    with pytest.raises(TypeError, match=r"AdvancedProfiler\(dirpath=3\) must be a path"):
        AdvancedProfiler(dirpath=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"XLAProfiler\(port=70000\) must be an int in \[1, 65535\]"):
        XLAProfiler(port=70000)
    # This venv has no torch_xla: refused when made, before any stage (tests/xla runs it for real).
    with pytest.raises(ModuleNotFoundError, match="XLAProfiler needs torch_xla.*pip install torch_xla"):
        Trainer(profiler="xla")


def test_custom_profiler_and_profile_context(tmp_path: Path) -> None:
    class Recording(Profiler):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[str] = []

        def start(self, action_name: str) -> None:
            self.events.append(f"+{action_name}")

        def stop(self, action_name: str) -> None:
            self.events.append(f"-{action_name}")

    class UsesProfiler(Callback):
        def on_train_start(self, trainer, module):  # type: ignore[no-untyped-def]
            with trainer.profiler.profile("my action"):
                pass

    profiler = Recording()
    _trainer(tmp_path, profiler, callbacks=[UsesProfiler()], max_epochs=1, limit_train_batches=1).fit(
        Module(), _data()
    )
    events = profiler.events
    hook = f"[Callback]{UsesProfiler.__qualname__}.on_train_start"  # a callback's state_key: its class
    assert events[events.index(f"+{hook}") :][:3] == [f"+{hook}", "+my action", "-my action"]
    batch = events.index("+run_training_batch")
    assert events[batch : batch + 2] == ["+run_training_batch", f"+{STRATEGY}.training_step"]
    assert events.count("+run_training_epoch") == events.count("-run_training_epoch") == 1
    # Without a profiler, trainer.profiler still takes the same code.
    with _trainer(tmp_path, None).profiler.profile("x") as name:
        assert name == "x"


def _distributed_fit(root: str) -> dict[str, Any]:
    """One rank of a 2-process fit, profiled twice: into each rank's file, then printed."""
    trainer = Trainer(
        max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        profiler=SimpleProfiler(dirpath=root, filename="perf"),
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as to_file:
        trainer.fit(Module(), _data(8))
    printing = Trainer(
        max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, profiler="simple",
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        printing.fit(Module(), _data(8))
    return {
        "rank": trainer.global_rank,
        "batches": trainer.profiler.call_counts["run_training_batch"],  # type: ignore[attr-defined]
        "to_file": to_file.getvalue(),
        "printed": printed.getvalue(),
    }


def test_each_rank_writes_its_file_and_only_rank_0_prints(tmp_path: Path) -> None:
    results = run_processes(_distributed_fit, str(tmp_path), nprocs=2, timeout=120)
    assert [r["rank"] for r in results] == [0, 1] and [r["batches"] for r in results] == [2, 2]
    for rank in (0, 1):
        text = (tmp_path / f"fit-perf-{rank}.txt").read_text()
        assert text.startswith("FIT Profiler Report") and "[Strategy]DDPStrategy.backward" in text
    assert [r["to_file"] for r in results] == ["", ""]
    assert "FIT Profiler Report" in results[0]["printed"] and "Profiler Report" not in results[1]["printed"]
