"""The batch-size finder (Lightning's ``Tuner.scale_batch_size`` and ``BatchSizeFinder``).

A search runs trials of ``steps_per_trial`` steps, each with the dataloaders rebuilt from the
module's (or DataModule's) ``*_dataloader()`` at a new ``batch_size``: doubling it until a trial
runs out of memory (``"power"``), then halving back, or bisecting between the last size that ran
and the first that did not (``"binsearch"``, which then keeps a ``margin`` below the size found).
Growth stops at ``max_val``. The run's state is saved before and restored after
(``trainer/search_state.py``), so the fit that follows starts as it would have without the search.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import IterableDataset

from ember._validation import check_choice, check_int, check_number, check_str, show
from ember.memory import is_out_of_memory, release_memory
from ember.strategies.capabilities import OwnsOptimizerStep
from ember.trainer.config import resolve_limit
from ember.trainer.data import find_loaders, loader_length
from ember.trainer.lr_finder import attribute_holders
from ember.trainer.lr_finder import set_lr as set_attribute
from ember.trainer.search_state import preserved, search_batches

if TYPE_CHECKING:
    from ember.data import PreparedDataLoader
    from ember.trainer.module import DataModule, TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["BatchSizeSettings", "StageData", "apply_batch_size", "scale_batch_size"]

MODES = ("power", "binsearch")
METHODS = ("fit", "validate", "test", "predict")
_KINDS = {"validate": "val", "test": "test", "predict": "predict"}  # an evaluation stage's loaders


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSizeSettings:
    """What one search does, checked when built: a bad value raises before anything runs."""

    mode: str = "power"
    steps_per_trial: int = 3
    init_val: int = 2
    max_trials: int = 25
    batch_arg_name: str = "batch_size"
    margin: float = 0.05
    max_val: int = 8192
    owner: str = field(default="scale_batch_size", compare=False)

    def __post_init__(self) -> None:
        owner = self.owner
        check_choice("mode", self.mode, MODES, owner=owner)
        check_int("steps_per_trial", self.steps_per_trial, minimum=1, owner=owner)
        check_int("init_val", self.init_val, minimum=1, owner=owner)
        check_int("max_trials", self.max_trials, minimum=1, owner=owner)
        check_str("batch_arg_name", self.batch_arg_name, owner=owner)
        if not self.batch_arg_name:
            raise ValueError(f"{owner}(batch_arg_name=''): name the batch-size attribute, e.g. 'batch_size'")
        check_number("margin", self.margin, owner=owner)
        if not 0 <= self.margin < 1:
            raise ValueError(f"{owner}(margin={self.margin!r}) must be between 0 and 1 (0 included, 1 not)")
        check_int("max_val", self.max_val, minimum=1, owner=owner)
        if self.init_val > self.max_val:
            raise ValueError(
                f"{owner}(init_val={self.init_val}) is above max_val={self.max_val}: the search starts at "
                "init_val and never goes past max_val"
            )

    def holders(self, module: TrainModule, datamodule: DataModule | None) -> list[tuple[Any, bool]]:
        """Where the batch size lives (Lightning's ``lightning_setattr`` order); ValueError if nowhere."""
        holders = attribute_holders(module, datamodule, self.batch_arg_name)
        if not holders:
            raise ValueError(
                f"{self.owner}(batch_arg_name={show(self.batch_arg_name)}): neither {type(module).__name__} nor its "
                "hparams (nor the DataModule or its hparams) has that attribute. Valid choices: an attribute "
                "your *_dataloader() reads the batch size from; add it, or name yours with batch_arg_name=..."
            )
        return holders


@dataclass(slots=True)
class StageData:
    """An evaluation stage's data, as its loop reads it: a search replaces the items of these very
    lists, so the loop runs at the batch size found."""

    kind: str  # "val", "test" or "predict"
    given: Any  # the dataloaders passed to validate/test/predict (None: the module's or DataModule's)
    datamodule: DataModule | None
    loaders: list[PreparedDataLoader]
    limits: list[int | float]


def check_tuner_call(method: str, train: Any, val: Any, loaders: Any) -> None:
    """``Tuner.scale_batch_size``'s data arguments, as Lightning checks them, before anything runs."""
    check_choice("method", method, METHODS, owner="scale_batch_size")
    passed = {"train_dataloaders": train, "val_dataloaders": val, "dataloaders": loaders}
    wrong = ("dataloaders",) if method == "fit" else ("train_dataloaders", "val_dataloaders")
    for name in wrong:
        if passed[name] is not None:
            raise ValueError(f"scale_batch_size(method={method!r}) takes no {name}: pass "
                             f"{'train_dataloaders/val_dataloaders' if method == 'fit' else 'dataloaders'}")  # fmt: skip
    if train is not None or (method != "fit" and loaders is not None):
        raise ValueError(
            "scale_batch_size rebuilds the dataloaders at each batch size it tries, from the module's or the "
            "DataModule's *_dataloader(): dataloaders passed directly cannot be resized. Define "
            "train_dataloader() (or val_/test_/predict_dataloader()) in the module or a DataModule"
        )


def search(settings: BatchSizeSettings, fits: Callable[[int], bool], length: int | None) -> int:
    """The largest batch size the trials found running: ``fits(size)`` runs one trial. Doubles from
    ``init_val`` until a failure, ``length`` (the dataset's, None: no cap) or ``max_val`` (the last
    doubling capped to it); then ``"power"`` keeps the last success (halving until one, if the first
    trials failed) and ``"binsearch"`` bisects, then takes ``margin`` off (Lightning's)."""
    size, low, high = settings.init_val, 0, None  # low: the largest success, high: the smallest failure
    for _ in range(settings.max_trials):
        if fits(size):
            low = size
        else:
            high = size
        if high is None:
            if length is not None and size >= length:
                break  # a batch holds the whole dataset: larger ones are the same batch
            if size >= settings.max_val:
                break
            size = min(size * 2, settings.max_val)
        elif low == 0:
            size = high // 2  # nothing ran yet: halve
            if size < 1:
                break
        elif settings.mode == "power" or high - low <= 1:
            break
        else:
            size = (low + high) // 2
    if low == 0:
        raise RuntimeError(
            f"{settings.owner}: every batch size tried ran out of memory (the smallest: {high}); free memory, "
            "shrink the model, or start lower with init_val (max_trials bounds the trials)"
        )
    if settings.mode == "binsearch":  # a safety buffer below the exact limit found
        return max(1, int(low * (1 - settings.margin)))
    return low


def scale_batch_size(trainer: Trainer, settings: BatchSizeSettings) -> int | None:
    """Search now (``BatchSizeFinder``'s hooks); the size found is written into the module's (or
    DataModule's) attribute and the stage's loaders are rebuilt with it. None: no search."""
    stage, module = trainer.stage, trainer.module
    if trainer.config.fast_dev_run:
        warnings.warn("fast_dev_run is set: the batch-size finder does not search", stacklevel=3)
        return None
    holders = settings.holders(module, trainer.datamodule)
    _check_search_data(trainer, settings, stage)
    name = settings.batch_arg_name
    original = holders[-1][0][name] if holders[-1][1] else getattr(holders[-1][0], name)
    was_training = module.training
    try:
        with preserved(trainer, [], "scale_batch_size"):
            start = trainer.state.state_dict()
            found = search(
                settings, lambda size: _trial(trainer, settings, start, size), _dataset_length(trainer)
            )
            set_attribute(holders, name, found)
            # The run goes on with the size found (the restore sets their positions).
            _rebuild_loaders(trainer)
    except BaseException:
        set_attribute(holders, name, original)
        raise
    finally:
        module.train(was_training)
    if trainer.is_global_zero:
        print(
            f"ember: batch size set to {found} ({type(module).__name__}.{name})",
            file=sys.stderr,
            flush=True,
        )
    return found


def apply_batch_size(trainer: Trainer, settings: BatchSizeSettings, size: int) -> None:
    """A resumed fit: the size the interrupted run found, set again; the loaders rebuilt with it
    keep the positions the checkpoint gave the fit's."""
    set_attribute(settings.holders(trainer.module, trainer.datamodule), settings.batch_arg_name, size)
    states = [loader.state_dict() for loader in [trainer._train_loader, *trainer._val_loaders] if loader]
    trainer._reload_loaders()
    loaders = [trainer._train_loader, *trainer._val_loaders]
    for loader, state in zip(loaders, states, strict=True):
        assert loader is not None
        loader.load_state_dict(state)


def _check_search_data(trainer: Trainer, settings: BatchSizeSettings, stage: str) -> None:
    given = trainer._sources[0] if stage == "fit" else (trainer._stage_data and trainer._stage_data.given)
    if given is not None:
        raise ValueError(
            f"{settings.owner} rebuilds the dataloaders at each batch size it tries, from the module's or the "
            f"DataModule's *_dataloader(); the dataloaders passed to {stage}() cannot be resized: define them "
            "in the module or a DataModule"
        )
    if stage == "fit" and isinstance(trainer.strategy, OwnsOptimizerStep):
        raise ValueError(
            f"{settings.owner}: under strategy={trainer.strategy.strategy_name!r} the engine fixes its micro-batch "
            "size when the model is prepared: search with DDP or a single device"
        )
    if stage != "fit" and (trainer._stage_data is None or len(trainer._stage_data.loaders) != 1):
        raise ValueError(f"{settings.owner} works with one {stage} dataloader")


def _dataset_length(trainer: Trainer) -> int | None:
    """The number of samples of the stage's dataset (Lightning's cap on growth); None: unsized."""
    loader = (
        trainer._train_loader if trainer.stage == "fit" else cast(StageData, trainer._stage_data).loaders[0]
    )
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        return None
    return len(dataset)


def _rebuild_loaders(trainer: Trainer) -> None:
    """The stage's loaders asked for again (they read the batch size now set), and prepared."""
    if trainer.stage == "fit":
        trainer._reload_loaders()
        return
    data = cast(StageData, trainer._stage_data)
    fresh = find_loaders(data.kind, None, data.datamodule, trainer.module)
    if len(fresh) != 1:
        raise ValueError(f"the batch-size search needs one {data.kind} dataloader, {data.kind}_dataloader() "
                         f"returned {len(fresh)}")  # fmt: skip
    loader = trainer._prepare_loader(
        fresh[0], evaluation=data.kind in ("val", "test"), predicting=data.kind == "predict"
    )
    trainer.accelerator._swap_dataloaders(data.loaders, [loader])
    limit = getattr(trainer.config, f"limit_{data.kind}_batches")
    data.loaders[0], data.limits[0] = loader, resolve_limit(limit, loader_length(loader))


def _trial(trainer: Trainer, settings: BatchSizeSettings, start: dict[str, Any], size: int) -> bool:
    """One trial at ``size``: True if it ran on every process, False if one ran out of memory."""
    holders = settings.holders(trainer.module, trainer.datamodule)
    set_attribute(holders, settings.batch_arg_name, size)
    _rebuild_loaders(trainer)
    trainer.state = type(trainer.state)(**start)  # each trial from the search's start (a fresh epoch)
    trainer._publish_status()  # (its fn, stage and status)
    trainer._metrics.reset()
    steps = settings.steps_per_trial
    if trainer.stage == "fit":
        ran = _train_trial(trainer, steps)
    else:
        ran = not _any_failed(trainer, not _evaluation_trial(trainer, steps))  # (one agreement per trial)
    if not ran:
        for optimizer in trainer.optimizers:  # a step cut short leaves gradients the fit must not add to
            optimizer.zero_grad(set_to_none=True)
        for parameter in trainer.module.parameters():
            parameter.grad = None
        release_memory()
    return ran


def _any_failed(trainer: Trainer, failed: bool) -> bool:
    """Whether some process's trial failed: every process decides together (a collective)."""
    if trainer.world_size == 1:
        return failed
    flag = torch.tensor(float(failed), device=trainer.accelerator.device)
    return bool(trainer.accelerator.reduce(flag, "max") > 0)


def _evaluation_trial(trainer: Trainer, steps: int) -> bool:
    """``steps`` batches of the stage's loop (its hooks too); False: out of memory."""
    from ember.trainer.loops import run_evaluation
    from ember.trainer.predict_loop import run_predict

    data = cast(StageData, trainer._stage_data)
    try:
        if data.kind == "predict":
            run_predict(trainer, data.loaders, [steps], keep=False)
        else:
            run_evaluation(trainer, "validation" if data.kind == "val" else "test", data.loaders, [steps])
    except Exception as exception:  # (not BaseException: an interrupt ends the search)
        if not is_out_of_memory(exception):
            raise
        return False
    return True


def _train_trial(trainer: Trainer, steps: int) -> bool:
    """``steps`` optimizer steps of training (the module's hooks, no validation), across epochs if
    need be. After each batch the processes agree whether one ran out of memory, so that one
    process's failure (in its optimizer step, say) ends the trial on all of them."""
    target = trainer.state.global_step + steps
    try:
        for _ in search_batches(trainer):
            if _any_failed(trainer, False):
                return False  # another process ran out of memory
            if trainer.state.global_step >= target:
                return True
        return True  # an epoch of no optimizer step (every training_step returned None)
    except Exception as exception:
        if not is_out_of_memory(exception):
            raise
    _any_failed(trainer, True)
    return False
