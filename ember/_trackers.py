"""The Accelerator's experiment trackers (🤗 Accelerate's ``log_with``), made of the Trainer's loggers.

``"csv"``, ``"tensorboard"``, ``"wandb"``, ``"mlflow"`` and ``"comet_ml"`` are ``CSVLogger``,
``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger`` and ``CometLogger``: one implementation for
both layers. Trackers exist on the main process only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

if TYPE_CHECKING:
    from ember.kwargs_handlers import ProfileKwargs
    from ember.strategies import Strategy
    from ember.trainer.loggers import Logger

    LogWith: TypeAlias = "str | Logger | Sequence[str | Logger] | None"

# tracker name -> the package it needs (None: none)
_PACKAGES = {
    "csv": None,
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
}
_CHOICES = (
    "'all', 'csv', 'tensorboard', 'wandb', 'mlflow', 'comet_ml', an ember Logger instance, or a list of those"
)


def _available(name: str) -> bool:
    package = _PACKAGES[name]
    return package is None or importlib.util.find_spec(package) is not None


def check_log_with(log_with: LogWith) -> list[str | Logger]:
    """The trackers ``log_with`` asks for: names (``"all"`` expanded to the installed ones) and loggers."""
    if log_with is None:
        return []
    # ember.trainer imports the Accelerator: its loggers are imported once both modules exist.
    from ember.trainer.loggers import Logger

    items = list(log_with) if isinstance(log_with, (list, tuple)) else [log_with]
    found: list[str | Logger] = []
    for item in items:
        if isinstance(item, Logger):
            found.append(item)
        elif item == "all":
            found += [name for name in _PACKAGES if _available(name)]
        elif isinstance(item, str) and item in _PACKAGES:
            if not _available(item):
                raise ModuleNotFoundError(
                    f"log_with={item!r} needs the {_PACKAGES[item]} package: pip install 'ember[{item}]'"
                )
            found.append(item)
        else:
            raise ValueError(f"log_with={log_with!r}: {item!r} is not a tracker. Valid choices: {_CHOICES}")
    return list(dict.fromkeys(found))


def tracker_name(logger: Logger) -> str:
    """``"csv"``, ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"comet_ml"`` for ember's loggers; a
    custom logger's ``name``."""
    from ember.trainer.loggers import CometLogger, CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    kinds: dict[type[Logger], str] = {
        CSVLogger: "csv",
        TensorBoardLogger: "tensorboard",
        WandbLogger: "wandb",
        MLFlowLogger: "mlflow",
        CometLogger: "comet_ml",
    }
    return next((name for kind, name in kinds.items() if isinstance(logger, kind)), logger.name)


class Trackers:
    """The trackers of one Accelerator: asked for at construction, created by ``start``."""

    def __init__(self, log_with: list[str | Logger], project_dir: str | os.PathLike[str] | None) -> None:
        self._requested = log_with
        self._project_dir = project_dir
        self._started = False
        self._next_step = 0
        self.loggers: list[Logger] = []

    def start(self, project_name: str, config: dict[str, Any] | None, init_kwargs: dict[str, dict[str, Any]] | None,
              main: bool) -> None:  # fmt: skip
        names = [item for item in self._requested if isinstance(item, str)]
        unknown = sorted(set(init_kwargs or {}) - set(names))
        if unknown:
            raise ValueError(
                f"init_kwargs has keys {unknown} that are not among this Accelerator's trackers {names}"
            )
        if self._started:
            raise RuntimeError(
                "init_trackers() was already called; call end_training() before starting again"
            )
        self._started = True
        if not main:
            return
        from ember.trainer.loggers import CometLogger, CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
        from ember.trainer.loggers.base import _params

        root = Path(self._project_dir if self._project_dir is not None else os.getcwd()) / project_name
        for item in self._requested:
            if not isinstance(item, str):
                self.loggers.append(item)
                continue
            kwargs = (init_kwargs or {}).get(item, {})
            if item == "wandb":
                self.loggers.append(WandbLogger(**{"project": project_name, "save_dir": root, **kwargs}))
            elif item == "mlflow":
                self.loggers.append(
                    MLFlowLogger(**{"experiment_name": project_name, "save_dir": root, **kwargs})
                )
            elif item == "comet_ml":  # offline, Comet's archives go to <root>/comet unless told otherwise
                offline = {"offline_directory": str(root / "comet")} if kwargs.get("online") is False else {}
                self.loggers.append(CometLogger(**{"project": project_name, **offline, **kwargs}))
            else:
                kind = CSVLogger if item == "csv" else TensorBoardLogger
                self.loggers.append(kind(**{"save_dir": root, "name": item, **kwargs}))
        if config is not None:
            for logger in self.loggers:
                logger.log_hyperparams(_params(config))  # (a Namespace, nested ones too, as dicts)

    def log(self, values: dict[str, Any], step: int | None, main: bool,
            log_kwargs: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        if self._requested and not self._started:
            raise RuntimeError("accelerator.log() needs accelerator.init_trackers(project_name) first")
        extra = self._check_log_kwargs(log_kwargs)  # on every process: the same refusal everywhere
        if not main or not self.loggers:
            return
        numbers_row: dict[str, float] = {}
        texts: dict[str, str] = {}
        for key, value in _flat(values):
            if isinstance(value, str):
                texts[key] = value
            else:
                numbers_row[key] = _number(key, value)
        step = self._next_step if step is None else step
        calls = [
            (logger, method, row, extra.get(tracker_name(logger), {}))
            for logger in self.loggers
            for method, row in (("log_metrics", numbers_row), ("log_text", texts))
            if row
        ]
        for logger, method, row, kwargs in calls:  # before any tracker logs: all of them or none
            if kwargs:
                try:
                    inspect.signature(getattr(logger, method)).bind(row, step, **kwargs)
                except TypeError as err:
                    raise TypeError(
                        f"log_kwargs[{tracker_name(logger)!r}]={kwargs!r}: {type(logger).__name__}.{method} does not "
                        f"take these arguments ({err})"
                    ) from None
        for logger, method, row, kwargs in calls:
            getattr(logger, method)(row, step, **kwargs)
        self._next_step = step + 1

    def _check_log_kwargs(self, log_kwargs: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        if log_kwargs is None:
            return {}
        names = [item if isinstance(item, str) else tracker_name(item) for item in self._requested]
        if not isinstance(log_kwargs, dict):
            raise TypeError(
                f"log_kwargs={log_kwargs!r} must be a dict of tracker names to keyword-argument dicts"
            )
        for name, kwargs in log_kwargs.items():
            if name not in names:
                raise ValueError(
                    f"log_kwargs={log_kwargs!r}: {name!r} is not a tracker of this Accelerator. Valid choices: {names}"
                )
            if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
                raise TypeError(f"log_kwargs[{name!r}]={kwargs!r} must be a dict of keyword arguments")
        return log_kwargs

    def get(self, name: str, unwrap: bool, main: bool) -> Any:
        if not main:
            from ember.trainer.loggers.base import _NoExperiment

            return _NoExperiment()
        for logger in self.loggers:
            if tracker_name(logger) == name:
                return logger.tracker if unwrap else logger
        active = [tracker_name(logger) for logger in self.loggers]
        raise ValueError(f"get_tracker({name!r}): no such tracker. Active trackers: {active}")

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()
        self.loggers, self._started = [], False


class TrackerMixin:
    """The Accelerator's tracker methods, and its profiler; mixed into :class:`~ember.Accelerator`.
    Trackers live on the main process only: elsewhere these do nothing."""

    _strategy: Strategy
    _trackers: Trackers
    profile_handler: ProfileKwargs | None

    @contextmanager
    def profile(self, profile_handler: ProfileKwargs | None = None) -> Iterator[torch.profiler.profile]:
        """Profile the block with ``torch.profiler`` (🤗 Accelerate's ``accelerator.profile()``); yields
        the profiler (``prof.key_averages().table()``, ``prof.step()`` under a schedule).

        Its options are ``profile_handler``'s, else the Accelerator's ``kwargs_handlers``
        :class:`~ember.ProfileKwargs`, else torch's defaults. With ``output_trace_dir``, each process
        writes its Chrome trace there: ``profile_<process_index>.json`` when the block ends (then
        every process waits for the others: every process enters the block), or, under a
        ``schedule_option``, ``profile_<process_index>_step<N>.json`` at the end of each active
        cycle (the profiler clears a cycle's events when it ends), before ``on_trace_ready``."""
        from ember.kwargs_handlers import ProfileKwargs  # (loaded here: a run that never profiles skips it)

        handler = profile_handler if profile_handler is not None else self.profile_handler or ProfileKwargs()
        if not isinstance(handler, ProfileKwargs):
            raise TypeError(
                f"profile(profile_handler=...) takes an ember.ProfileKwargs, not {type(handler).__name__}"
            )
        directory, rank = handler.output_trace_dir, self._strategy.global_rank
        scheduled = handler.schedule_option is not None
        if directory is not None:  # before the block runs: a bad directory fails now, not after it
            os.makedirs(directory, exist_ok=True)
            if scheduled:
                ready = _exporting(directory, rank, handler.on_trace_ready)
                handler = dataclasses.replace(handler, on_trace_ready=ready)
        with handler.build() as profiler:
            yield profiler
        if directory is None:
            return
        if not scheduled:
            profiler.export_chrome_trace(os.path.join(directory, f"profile_{rank}.json"))
        self._strategy.barrier("profile")

    def init_trackers(self, project_name: str, config: dict[str, Any] | None = None,
                      init_kwargs: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        """Start the ``log_with`` trackers under ``<project_dir>/<project_name>``; ``config`` is logged as
        hyper-parameters; ``init_kwargs`` maps a tracker name to its logger's arguments."""
        self._trackers.start(project_name, config, init_kwargs, main=self._strategy.is_global_zero)

    def log(self, values: dict[str, Any], step: int | None = None,
            log_kwargs: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
        """Send values to the trackers at ``step`` (``None``: one past the previous call's step).

        Numbers and one-element tensors are metrics (tensors are converted with ``float()`` here, on
        the main process: a device sync per call); strings are text (a CSV column, a TensorBoard
        text summary, a W&B field); a nested dict's keys are joined with ``/``
        (``{"eval": {"loss": 0.3}}`` logs ``eval/loss``). ``log_kwargs`` maps a tracker name to
        keyword arguments of its logger's ``log_metrics``/``log_text`` (🤗 Accelerate's), e.g.
        ``{"wandb": {"commit": False}, "tensorboard": {"walltime": t}}``.
        """
        self._trackers.log(values, step, main=self._strategy.is_global_zero, log_kwargs=log_kwargs)

    @property
    def trackers(self) -> list[Logger]:
        """The running trackers (``init_trackers``), on the main process; empty elsewhere."""
        return list(self._trackers.loggers)

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        """The ``Logger`` of tracker ``name``; with ``unwrap``, the object it writes through (its
        ``tracker``: the ``SummaryWriter``, the wandb run, the ``MlflowClient``, the comet experiment).
        As 🤗 Accelerate's trackers, the loggers also name it ``writer`` (TensorBoard, Comet) or
        ``run`` (W&B); ``MLFlowLogger.active_run`` is the run as an ``mlflow.ActiveRun``."""
        return self._trackers.get(name, unwrap, main=self._strategy.is_global_zero)


def _exporting(directory: str, rank: int, then: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """An ``on_trace_ready`` that writes each active cycle's Chrome trace, then calls ``then``."""

    def ready(profiler: Any) -> None:
        profiler.export_chrome_trace(os.path.join(directory, f"profile_{rank}_step{profiler.step_num}.json"))
        if then is not None:
            then(profiler)

    return ready


def _flat(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``values`` with nested dicts' keys joined by ``/`` (``{"eval": {"loss": 1}}``: ``eval/loss``)."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, f"{name}/")
        else:
            yield name, value


def _number(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value)  # a device-to-host copy: the caller asked for this value now
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"accelerator.log() takes numbers, one-element tensors, strings and dicts of these; {key!r} is a "
        f"{type(value).__name__}. "
        "Log other objects through the tracker itself, e.g. accelerator.get_tracker('wandb', unwrap=True).log(...)"
    )
