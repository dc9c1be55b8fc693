"""The learning-rate range test's pieces: its settings, the callback that drives and records it
during the search, and :class:`LRFinder`, the result (``Tuner.lr_find``, ``LearningRateFinder``).

The search itself (save, train, restore) is a Trainer method: ``trainer/tuner.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember._validation import check_bool, check_choice, check_int, check_number, check_str, show
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["LRFinder"]

MODES = ("exponential", "linear")
_BETA = 0.98  # Lightning's smoothing of the recorded loss
_ATTRIBUTES = ("lr", "learning_rate")  # looked for when attr_name is ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSettings:
    """What one search does, checked when built: a bad value raises before any training step."""

    min_lr: float = 1e-8
    max_lr: float = 1.0
    num_training: int = 100
    mode: str = "exponential"
    early_stop_threshold: float | None = 4.0
    update_attr: bool = True
    attr_name: str = ""
    owner: str = field(default="lr_find", compare=False)
    steps_name: str = field(default="num_training", compare=False)  # the callback's num_training_steps

    def __post_init__(self) -> None:
        owner = self.owner
        check_choice("mode", self.mode, MODES, owner=owner)
        check_number("min_lr", self.min_lr, minimum=0, above=True, owner=owner)
        check_number("max_lr", self.max_lr, minimum=0, above=True, owner=owner)
        if self.min_lr >= self.max_lr:
            raise ValueError(
                f"{owner}(min_lr={show(self.min_lr)}, max_lr={show(self.max_lr)}): min_lr must be below max_lr"
            )
        check_int(self.steps_name, self.num_training, minimum=1, owner=owner)
        check_number("early_stop_threshold", self.early_stop_threshold, minimum=0, above=True, owner=owner,
                     optional=True)  # fmt: skip
        check_bool("update_attr", self.update_attr, owner=owner)
        check_str("attr_name", self.attr_name, owner=owner)

    def lr_at(self, step: int) -> float:
        """The learning rate of the search's ``step``-th optimizer step (from 0): ``min_lr`` at the
        first, ``max_lr`` at the last, geometrically (``"exponential"``) or evenly (``"linear"``) between."""
        if self.num_training == 1:
            return self.min_lr
        fraction = step / (self.num_training - 1)
        if self.mode == "linear":
            return self.min_lr + (self.max_lr - self.min_lr) * fraction
        return float(self.min_lr * (self.max_lr / self.min_lr) ** fraction)


class LRFinder:
    """The result of a learning-rate search (Lightning's ``_LRFinder``).

    ``results`` holds two lists of the same length, one entry per optimizer step of the search:
    ``"lr"``, the learning rate of the step, and ``"loss"``, the training loss smoothed up to that
    step (exponential moving average with ``beta=0.98``, bias-corrected; on several processes the
    loss is first averaged across them, so every process holds the same values).

    Example::

        finder = Tuner(trainer).lr_find(module, loader)
        finder.suggestion()        # the learning rate at the loss's steepest descent
        finder.plot(suggest=True)  # loss against learning rate (matplotlib)
    """

    def __init__(self, mode: str, min_lr: float, max_lr: float, num_training: int) -> None:
        self.mode = mode
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.num_training = num_training
        self.results: dict[str, list[float]] = {"lr": [], "loss": []}
        self._optimal_idx: int | None = None

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The learning rate where the smoothed loss falls fastest (Lightning's rule): the smallest
        gradient of the loss with respect to the learning rate, over the steps left after dropping
        the first ``skip_begin`` and the last ``skip_end`` (and any non-finite loss). ``None``, with a
        warning, when fewer than two steps remain."""
        check_int("skip_begin", skip_begin, minimum=0, owner="suggestion")
        check_int("skip_end", skip_end, minimum=0, owner="suggestion")
        self._optimal_idx = self._steepest(skip_begin, skip_end)
        if self._optimal_idx is None:
            warnings.warn(
                f"the learning-rate search recorded {len(self.results['loss'])} steps; with skip_begin={skip_begin} "
                f"and skip_end={skip_end}, fewer than 2 finite losses are left to suggest a learning rate from: "
                "run more steps (num_training, more training data) or skip fewer",
                stacklevel=2,
            )
            return None
        return self.results["lr"][self._optimal_idx]

    def _steepest(self, skip_begin: int, skip_end: int) -> int | None:
        count = len(self.results["loss"])
        kept = torch.arange(count)[skip_begin : max(count - skip_end, 0)]
        losses = torch.tensor(self.results["loss"], dtype=torch.float64)[kept]
        lrs = torch.tensor(self.results["lr"], dtype=torch.float64)[kept]
        finite = torch.isfinite(losses)
        if int(finite.sum()) < 2:
            return None
        gradient = torch.gradient(losses[finite], spacing=(lrs[finite],))[0]
        return int(kept[finite][int(torch.argmin(gradient))])

    def plot(self, suggest: bool = False, show: bool = False, ax: Axes | None = None) -> Figure:
        """Draw the loss against the learning rate (a log scale in ``"exponential"`` mode) with
        matplotlib, into ``ax`` or a new figure; ``suggest``: mark :meth:`suggestion` with a red
        dot; ``show``: ``pyplot.show()``. Returns the figure."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("LRFinder.plot needs matplotlib: pip install 'ember[plot]'") from None
        if ax is None:
            figure, ax = plt.subplots()
        else:
            figure = ax.figure  # type: ignore[assignment]
        lrs, losses = self.results["lr"], self.results["loss"]
        ax.plot(lrs, losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if suggest and self.suggestion() is not None:
            assert self._optimal_idx is not None
            index = self._optimal_idx
            ax.plot(lrs[index], losses[index], markersize=10, marker="o", color="red")
        if show:
            plt.show()
        return figure

    def __repr__(self) -> str:
        return f"LRFinder(mode={self.mode!r}, min_lr={self.min_lr}, max_lr={self.max_lr}, steps={len(self.results['lr'])})"


class SearchRecorder(Callback):
    """The one callback of the Trainer during a search: it sets the learning rate of each optimizer
    step and records the smoothed loss after it; :attr:`stop` ends the search."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.stop = False
        self._average = 0.0
        self._best = math.inf

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Set right before the step, so accumulation, clipping and the module's own step all use it.
        lr = self.settings.lr_at(len(self.lrs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.lrs.append(lr)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.losses) == len(self.lrs):
            return  # no optimizer step in this batch (accumulating)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        # (the loss, and whether there is one: training_step may return None)
        value = torch.zeros(2, device=trainer.accelerator.device)
        if isinstance(loss, torch.Tensor):
            value = torch.stack([loss.detach().float().reshape(()), value.new_ones(())])
        if trainer.world_size > 1:  # every process the same value, so the same decisions
            value = trainer.accelerator.reduce(value, "sum")  # the mean of the processes with a loss
        total, count = value.tolist()
        if count:
            self._record(total / count)
        else:  # As Lightning's: training_step returned None, the step is recorded as NaN, which the
            self.losses.append(math.nan)  # smoothing, the divergence check and the suggestion leave out
            self.stop = self.stop or len(self.losses) >= self.settings.num_training

    def _record(self, loss: float) -> None:
        step = len(self.losses)
        self._average = _BETA * self._average + (1 - _BETA) * loss
        smoothed = self._average / (1 - _BETA ** (step + 1))
        threshold = self.settings.early_stop_threshold
        if (
            threshold is not None
            and step > 0
            and (not math.isfinite(smoothed) or smoothed > threshold * self._best)
        ):
            self.stop = True  # diverging
        if step == 0 or smoothed < self._best:
            self._best = smoothed
        self.losses.append(smoothed)
        if len(self.losses) >= self.settings.num_training:
            self.stop = True


def lr_holders(
    module: TrainModule, datamodule: Any, attr_name: str, owner: str
) -> tuple[str, list[tuple[Any, bool]]]:
    """The name of the learning-rate attribute and every object holding it, as Lightning looks:
    the module, its ``hparams``, the DataModule and its ``hparams``; ``(holder, is_mapping)``.
    ``attr_name`` "" tries ``lr``, then ``learning_rate``. AttributeError when none holds it."""
    for name in (attr_name,) if attr_name else _ATTRIBUTES:
        holders = attribute_holders(module, datamodule, name)
        if holders:
            return name, holders
    wanted = repr(attr_name) if attr_name else "'lr' or 'learning_rate'"
    raise AttributeError(
        f"{owner}(update_attr=True) writes the suggested learning rate into {wanted}, and neither "
        f"{type(module).__name__} nor its hparams (nor the DataModule) has it: add the attribute, name yours with "
        "attr_name=..., or pass update_attr=False"
    )


def attribute_holders(module: Any, datamodule: Any, name: str) -> list[tuple[Any, bool]]:
    """Every object holding attribute ``name``, in Lightning's order (``lightning_setattr``): the
    module, its ``hparams``, the DataModule and its ``hparams``; ``(holder, is_mapping)``. Lightning's
    ``lightning_getattr`` reads the last."""
    holders: list[tuple[Any, bool]] = []
    for holder in (module, datamodule):
        if holder is None:
            continue
        if hasattr(holder, name):
            holders.append((holder, False))
        hparams = getattr(holder, "hparams", None)
        if isinstance(hparams, MutableMapping) and name in hparams:
            holders.append((hparams, True))
    return holders


def set_lr(holders: list[tuple[Any, bool]], name: str, lr: Any) -> None:
    """Write ``lr`` (or any value) into every holder :func:`attribute_holders` found."""
    for holder, is_mapping in holders:
        if is_mapping:
            holder[name] = lr
        else:
            setattr(holder, name, lr)
