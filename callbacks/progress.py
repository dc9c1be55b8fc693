"""Progress display: a live rich bar in a terminal, plain periodic lines in logs and CI."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember._validation import check_bool, check_int
from ember.callbacks.progress_bar import ProgressBar
from ember.strategies.environment import may_be_terminal, running_in_ci

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, TaskID

    from ember.callbacks.rich_theme import RichProgressBarTheme
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["RichProgressBar"]

_BATCH_ENDS = ("on_train_batch_end", "on_validation_batch_end", "on_test_batch_end", "on_predict_batch_end")


def _speed_column() -> ProgressColumn:
    """A column with the speed in batches per second (rich is imported here: only when drawing)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        @override
        def render(self, task: Task) -> Text:
            speed = task.speed
            return Text("? it/s" if speed is None else f"{speed:.2f} it/s", style="progress.data.speed")

    return SpeedColumn()


def format_value(value: Any) -> str:
    """A metric as the progress bars show it: an int (``v_num``) or a string as is, a float in 4
    decimals or scientific."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    value = float(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _format_metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{name}={format_value(value)}" for name, value in metrics.items())


def _finite(total: float) -> int | None:
    return int(total) if math.isfinite(total) else None


class RichProgressBar(ProgressBar):
    """Show training and evaluation progress on global rank 0.

    In an interactive terminal (and not under CI, see ``CI``) it draws a rich progress bar per
    stage: ``Epoch N`` with batches done/total, speed, elapsed time, ETA and
    :meth:`get_metrics` (``trainer.progress_bar_metrics``), plus a bar for validation, test and
    prediction. Otherwise it
    prints one plain line every ``plain_every_n_batches`` training batches and one per epoch, e.g.
    ``epoch 0  step 40/63  12.3 it/s  loss=0.4312``, which reads well in log files.

    The bar is redrawn every ``refresh_rate`` batches (``0`` turns the callback off). The metrics are
    read only when a bar or line is drawn, because reading them converts tensors to Python floats,
    a device synchronization each time. ``console`` is the ``rich.console.Console`` to draw on, or
    ``console_kwargs`` its arguments; ``theme`` (a :class:`RichProgressBarTheme`) styles the rich bars
    as Lightning's do.

    Example::

        trainer = Trainer(callbacks=[RichProgressBar(refresh_rate=10, leave=True)])
    """

    progress_bar = True

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        plain_every_n_batches: int = 50,
        *,
        console: Console | None = None,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"RichProgressBar(refresh_rate={refresh_rate!r}) must be an int >= 0 (0: off)")
        check_int("plain_every_n_batches", plain_every_n_batches, minimum=1, owner="RichProgressBar")
        check_bool("leave", leave, owner="RichProgressBar")
        # (rich_theme is imported only for these arguments: the default bar never needs it)
        if console is not None or theme is not None or console_kwargs is not None:
            from ember.callbacks.rich_theme import RichProgressBarTheme, _console_of, _is_console
        if console is not None and not _is_console(console):
            raise TypeError(f"RichProgressBar(console={console!r}) must be None or a rich.console.Console")
        if theme is not None and not isinstance(theme, RichProgressBarTheme):
            raise TypeError(f"RichProgressBar(theme={theme!r}) must be None or a RichProgressBarTheme")
        if console_kwargs is not None:
            if console is not None:
                raise ValueError("RichProgressBar(console=..., console_kwargs=...): pass one of them")
            console = _console_of(console_kwargs)
        self._theme = theme
        self._refresh_rate = refresh_rate
        self._shows: bool | None = None  # whether this process shows progress (see _active)
        self._leave = leave
        self._plain_every = plain_every_n_batches
        self._console = console  # None: a default Console, created when first needed
        self._rich: bool | None = None  # decided once, on first use
        self._stage = "fit"
        self._progress: Progress | None = None
        self._train_task: TaskID | None = None
        self._eval_task: TaskID | None = None
        self._train_done = 0
        self._eval_done = 0
        # Every how many training batches a batch end draws, and the epoch's length (None: not yet
        # known this epoch; period 0: never, this process shows nothing).
        self._train_period: tuple[int, int | None] | None = None
        self._train_total: int | None = None  # this epoch's total_train_batches (None: unknown)
        # time.monotonic() when the epoch / the evaluation started, for the rate on plain lines.
        self._train_started = 0.0
        self._eval_started = 0.0

    @property
    def refresh_rate(self) -> int:
        """Every how many batches the bars are redrawn (``0``: never)."""
        return self._refresh_rate

    @property
    @override
    def is_enabled(self) -> bool:
        return not self._disabled and self._refresh_rate > 0

    def _active(self, trainer: Trainer) -> bool:
        if self._shows is None:  # asked on every batch: the answer holds for the whole stage
            self._shows = self._refresh_rate > 0 and trainer.is_global_zero and not self._disabled
        return self._shows

    @override
    def _on_toggle(self) -> None:
        self._shows, self._train_period = None, None  # decided again at the next batch

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None and kwargs.keys() <= {"sep", "end"}:  # above the live bars
            self._progress.console.print(*args, **kwargs)
        else:  # (rich's print takes no file= or flush=; the live display shows stdout above the bars too)
            print(*args, **kwargs)

    def _use_rich(self) -> bool:
        if self._rich is None:
            if self._console is None and not may_be_terminal():
                self._rich = False  # a file or a pipe: plain lines, without importing rich at all
            else:
                if self._console is None:
                    from rich.console import Console

                    self._console = Console()
                self._rich = self._console.is_terminal and not running_in_ci()
        return self._rich

    def _live(self) -> Progress:
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                self._theme.columns(_speed_column())
                if self._theme is not None
                else [
                    TextColumn("[progress.description]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    _speed_column(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[metrics]}", markup=False),
                ]
            )
            self._progress = Progress(*columns, console=self._console)
            self._progress.start()
        return self._progress

    def _rich_metrics(self, trainer: Trainer) -> str:
        metrics = self.get_metrics(trainer, trainer.module)
        return self._theme.format_metrics(metrics) if self._theme is not None else _format_metrics(metrics)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._train_task, self._eval_task = None, None, None

    def _period(self, trainer: Trainer) -> tuple[int, int | None]:
        """(every how many training batches a batch end may draw, the epoch's length)."""
        if not self._active(trainer):
            return 0, None
        every = self._refresh_rate if self._use_rich() else self._plain_every
        return every, self._train_total

    def _due(self, done: int, total: int | None) -> bool:
        return done % self._refresh_rate == 0 or done == total

    def _plain_line(
        self, head: str, done: int, total: int | None, started: float, metrics: dict[str, Any]
    ) -> None:
        elapsed = time.monotonic() - started
        rate = f"{done / elapsed:.1f} it/s" if elapsed > 0 else "? it/s"
        parts = [head, f"step {done}/{'?' if total is None else total}", rate]
        if metrics:
            parts.append(_format_metrics(metrics))
        print("  ".join(parts), flush=True)

    # -- lifetime of the display ----------------------------------------------------------------
    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        # A process that shows nothing (not rank 0, or refresh_rate=0): its batch ends only return.
        if self._refresh_rate > 0 and trainer.is_global_zero:
            return frozenset()
        return frozenset(
            name for name in _BATCH_ENDS if getattr(type(self), name) is getattr(RichProgressBar, name)
        )

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        super().setup(trainer, module, stage)
        self._stage = stage
        self._shows = None
        self._train_period = None

    @override
    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._stop()

    @override
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        self._stop()

    # -- training -------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._train_period = None
        if not self._active(trainer):
            return
        # (with max_steps and max_epochs=-1: the steps left; read here, before this epoch's steps count)
        self._train_total = total = _finite(float(self.total_train_batches))
        self._train_done, self._train_started = 0, time.monotonic()
        if not self._use_rich():
            return
        progress = self._live()
        description = f"Epoch {trainer.current_epoch}"
        if self._train_task is None or self._leave:  # leave: a new bar per epoch, old ones stay
            self._train_task = progress.add_task(description, total=total, metrics="")
        else:
            progress.reset(self._train_task, total=total, description=description, metrics="")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_done = done = batch_idx + 1
        period = self._train_period
        if period is None:  # the first batch of the epoch (or of a resumed one)
            period = self._train_period = self._period(trainer)
        every, total = period
        if not every or (done % every and done != total):  # (asked every batch) nothing to draw
            return
        if self._use_rich():
            if self._train_task is not None and self._due(done, total):
                metrics = self._rich_metrics(trainer)
                self._live().update(self._train_task, completed=done, metrics=metrics)
        elif done % self._plain_every == 0:
            if done != total:  # the last batch gets the epoch line
                head = f"epoch {trainer.current_epoch}"
                self._plain_line(
                    head, done, total, self._train_started, self.get_metrics(trainer, trainer.module)
                )

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._active(trainer):
            return
        total = self._train_total
        if not self._use_rich():
            head = f"epoch {trainer.current_epoch}"
            self._plain_line(
                head, self._train_done, total, self._train_started, self.get_metrics(trainer, trainer.module)
            )
        elif self._train_task is not None:  # epoch-end metrics (validation results among them)
            metrics = self._rich_metrics(trainer)
            self._live().update(self._train_task, completed=self._train_done, metrics=metrics)

    # -- evaluation: validation, test, prediction share one bar ---------------------------------
    def _eval_start(self, trainer: Trainer, description: str, total: int | None) -> None:
        if not self._active(trainer):
            return
        self._eval_done, self._eval_started = 0, time.monotonic()
        if self._use_rich():
            self._eval_task = self._live().add_task(description, total=total, metrics="")

    def _eval_batch_end(self, trainer: Trainer, total: int | None) -> None:
        if not self._active(trainer):
            return
        self._eval_done += 1
        if self._eval_task is not None and self._due(self._eval_done, total):
            self._live().update(self._eval_task, completed=self._eval_done)

    def _eval_end(self, trainer: Trainer, head: str, total: int | None) -> None:
        if not self._active(trainer):
            return
        if self._eval_task is not None:
            # Inside fit the validation bar makes room for the next epoch unless asked to stay.
            if self._stage == "fit" and not self._leave:
                self._live().remove_task(self._eval_task)
            self._eval_task = None
        elif self._stage != "fit" and not self._use_rich():
            # During fit the epoch line reports validation results; standalone runs get their own.
            self._plain_line(
                head, self._eval_done, total, self._eval_started, self.get_metrics(trainer, trainer.module)
            )

    def _val_total(self, trainer: Trainer) -> int | None:
        return _finite(float(self.total_val_batches))  # (the sanity check's, while it runs)

    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        description = (
            self.sanity_check_description if trainer.sanity_checking else self.validation_description
        )
        self._eval_start(trainer, description, self._val_total(trainer))

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, self._val_total(trainer))

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end(trainer, "validation", self._val_total(trainer))

    @override
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, self.test_description, _finite(float(sum(trainer.num_test_batches))))

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, _finite(float(sum(trainer.num_test_batches))))

    @override
    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end(trainer, "test", _finite(float(sum(trainer.num_test_batches))))

    @override
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, self.predict_description, _finite(float(sum(trainer.num_predict_batches))))

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        module: TrainModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, _finite(float(sum(trainer.num_predict_batches))))

    @override
    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end(trainer, "predict", _finite(float(sum(trainer.num_predict_batches))))
