"""Lightning's default progress bar, on tqdm, for those who pass it: ``Trainer(callbacks=[TQDMProgressBar()])``."""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import TYPE_CHECKING, Any, TextIO

from typing_extensions import override

from ember._validation import check_bool, check_int
from ember.callbacks.progress import format_value
from ember.callbacks.progress_bar import ProgressBar

if TYPE_CHECKING:
    from tqdm import tqdm

    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["TQDMProgressBar"]

_HOOKS = (
    *("on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end"),
    *("on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end"),
)


def _total(count: float | None) -> int | None:
    """tqdm's total: None for an unknown or infinite count."""
    return int(count) if count is not None and math.isfinite(count) else None


class TQDMProgressBar(ProgressBar):
    """Lightning's default progress bar: tqdm bars on global rank 0, for code that passes it
    explicitly (ember's default bar is :class:`RichProgressBar`; this one replaces it). Needs
    ``pip install tqdm``.

    ``Epoch N`` counts the training batches, with :meth:`get_metrics` (``trainer.progress_bar_metrics``)
    in the postfix (``loss=0.4312``, formatted as ember's bar formats them); ``Sanity Checking``, ``Validation``,
    ``Testing`` and ``Predicting`` bars count evaluation batches. The bars are redrawn every
    ``refresh_rate`` batches (``0`` turns the callback off), at ``2 * process_position`` lines
    down (the validation bar one more, under the training bar). ``leave=True`` keeps each epoch's
    bar on screen. ``file``: where to draw (default ``sys.stdout``, as Lightning).

    Example::

        trainer = Trainer(callbacks=[TQDMProgressBar(refresh_rate=10)])
    """

    progress_bar = True

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        *,
        file: TextIO | None = None,
    ) -> None:
        check_int("refresh_rate", refresh_rate, minimum=0, owner="TQDMProgressBar")
        check_int("process_position", process_position, minimum=0, owner="TQDMProgressBar")
        check_bool("leave", leave, owner="TQDMProgressBar")
        if file is not None and not callable(getattr(file, "write", None)):
            raise TypeError(f"TQDMProgressBar(file={file!r}) must be None or a text stream (with write())")
        if importlib.util.find_spec("tqdm") is None:
            raise ModuleNotFoundError(
                "TQDMProgressBar draws with tqdm, which is not installed: pip install tqdm"
            )
        self.refresh_rate = refresh_rate
        self.process_position = process_position
        self._leave = leave
        self._file = file
        self._stage = "fit"
        self._train_bar: tqdm[Any] | None = None
        self._eval_bar: tqdm[Any] | None = None
        self._eval_loader: int | None = None  # the evaluation loader the bar counts
        self._eval_name = ""
        self._eval_counts: list[int | float] = []

    @property
    @override
    def is_enabled(self) -> bool:
        return not self._disabled and self.refresh_rate > 0

    def _enabled(self, trainer: Trainer) -> bool:
        return self.refresh_rate > 0 and trainer.is_global_zero and not self._disabled

    @override
    def print(self, *args: Any, sep: str = " ", end: str = "\n", **kwargs: Any) -> None:
        if self._train_bar is None and self._eval_bar is None:
            print(*args, sep=sep, end=end, **kwargs)
        else:  # above the bars
            from tqdm import tqdm

            tqdm.write(sep.join(map(str, args)), end=end, file=kwargs.get("file") or self._file or sys.stdout)

    def _new_bar(self, description: str, position: int, leave: bool, **kwargs: Any) -> tqdm[Any]:
        from tqdm import tqdm  # (only once there is something to draw)

        return tqdm(
            desc=description,
            position=position,
            leave=leave,
            dynamic_ncols=True,
            file=self._file if self._file is not None else sys.stdout,
            bar_format=self.BAR_FORMAT,
            **kwargs,
        )

    def _due(self, done: int, total: int | None) -> bool:
        return done % self.refresh_rate == 0 or done == total

    @staticmethod
    def _draw(bar: tqdm[Any], done: int) -> None:
        bar.n = done
        bar.refresh()

    def _postfix(self, trainer: Trainer) -> None:
        if self._train_bar is not None:  # reading the metrics syncs the device: only when drawing
            metrics = {
                name: format_value(value) for name, value in self.get_metrics(trainer, trainer.module).items()
            }
            self._train_bar.set_postfix(metrics)

    def _close(self) -> None:
        for bar in (self._eval_bar, self._train_bar):
            if bar is not None:
                bar.close()
        self._train_bar = self._eval_bar = self._eval_loader = None

    # -- lifetime ---------------------------------------------------------------------------------
    @override
    def inactive_hooks(self, trainer: Trainer) -> frozenset[str]:
        if self._enabled(trainer):  # else (not rank 0, or refresh_rate=0) the batch hooks only return
            return frozenset()
        return frozenset(n for n in _HOOKS if getattr(type(self), n) is getattr(TQDMProgressBar, n))

    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        super().setup(trainer, module, stage)
        self._stage = stage

    @override
    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._close()

    @override
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        self._close()

    # -- training ---------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._enabled(trainer) and not self._leave:  # one bar, reset each epoch
            self._train_bar = self._new_bar(
                self.train_description, 2 * self.process_position, True, smoothing=0
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._enabled(trainer):
            return
        if self._leave:  # a bar per epoch, each left on screen
            self._train_bar = self._new_bar(
                self.train_description, 2 * self.process_position, True, smoothing=0
            )
        bar = self._train_bar
        assert bar is not None
        bar.reset(total=_total(self.total_train_batches))  # (max_steps may end the epoch early)
        bar.initial = 0
        bar.set_description(f"Epoch {trainer.current_epoch}")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self._train_bar
        if bar is not None and not self._disabled and self._due(batch_idx + 1, bar.total):
            self._draw(bar, batch_idx + 1)
            self._postfix(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._postfix(trainer)  # the epoch's values, validation results among them
        if self._leave and self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    # -- evaluation: a bar per stage, reset for each dataloader ------------------------------------
    def _eval_start(
        self, trainer: Trainer, description: str, counts: list[int | float], below_training: bool = False
    ) -> None:
        if not self._enabled(trainer):
            return
        position = 2 * self.process_position + below_training
        self._eval_bar = self._new_bar(description, position, leave=not below_training)
        self._eval_loader, self._eval_name, self._eval_counts = None, description, counts

    def _eval_batch_start(self, trainer: Trainer, dataloader_idx: int) -> None:
        bar = self._eval_bar
        if bar is None or dataloader_idx == self._eval_loader:
            return
        self._eval_loader = dataloader_idx
        counts = self._eval_counts  # (the stage's batch counts, per loader)
        bar.reset(total=_total(counts[dataloader_idx]) if dataloader_idx < len(counts) else None)
        bar.initial = 0
        bar.set_description(f"{self._eval_name} DataLoader {dataloader_idx}")

    def _eval_batch_end(self, batch_idx: int) -> None:
        bar = self._eval_bar
        if bar is not None and self._due(batch_idx + 1, bar.total):
            self._draw(bar, batch_idx + 1)

    def _eval_end(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
        self._eval_bar = self._eval_loader = None

    @override
    def on_sanity_check_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, self.sanity_check_description, trainer.num_sanity_val_batches)

    @override
    def on_sanity_check_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end()

    @override
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not trainer.sanity_checking:  # (the sanity check has its own bar)
            below = self._stage == "fit"
            self._eval_start(
                trainer, self.validation_description, trainer.num_val_batches, below_training=below
            )

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_start(trainer, dataloader_idx)

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
        self._eval_batch_end(batch_idx)

    @override
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._stage == "fit" and not trainer.sanity_checking:
            self._postfix(trainer)
        if not trainer.sanity_checking:
            self._eval_end()

    @override
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, self.test_description, trainer.num_test_batches)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_start(trainer, dataloader_idx)

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
        self._eval_batch_end(batch_idx)

    @override
    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end()

    @override
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_start(trainer, self.predict_description, trainer.num_predict_batches)

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_batch_start(trainer, dataloader_idx)

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
        self._eval_batch_end(batch_idx)

    @override
    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._eval_end()
