"""The Trainer's arguments, validated in one place before anything starts."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

import torch

from ember._validation import (
    DEFAULT_COLLECTIVE_TIMEOUT,
    check_bool,
    check_choice,
    check_collective_timeout,
    check_number,
    check_path,
    show,
)
from ember.precision import Precision
from ember.strategies.environment import detect_environment, launch_defaults
from ember.trainer.loggers import CSVLogger, Logger
from ember.trainer.profilers.base import resolve_profiler

__all__ = [
    "TrainerConfig", "as_list", "check_sync_batchnorm", "parse_duration", "resolve_limit", "resolve_loggers",
]  # fmt: skip


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def _limit(name: str, value: Any) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, float) and 0.0 <= value <= 1.0
    )
    if not ok:
        raise ValueError(
            f"{name}={value!r} must be an int >= 0 (a number of batches) or a float in [0.0, 1.0] (a fraction)"
        )


# What Lightning's other plugin kinds are for, and how ember does that (plugins= refuses them).
_OTHER_PLUGINS = {
    "ClusterEnvironment": "ember reads torchrun's, SLURM's and ember launch's variables by itself "
    "(ember.strategies.detect_environment)",
    "CheckpointIO": "ember writes its own pickle-free checkpoint format (docs: concepts/checkpoints)",
    "LayerSync": "pass sync_batchnorm=True",
}


def _precision_of_plugins(plugins: Any, precision: Any) -> Any:
    """The precision that ``plugins`` (Lightning's argument) gives, else ``precision``: ember's
    plugins are its Precision classes; Lightning's other kinds are refused with ember's way."""
    if plugins is None:
        return precision
    items = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    for item in items:
        if not isinstance(item, Precision):
            bases = {cls.__name__ for cls in type(item).__mro__}
            hint = next((f": {how}" for kind, how in _OTHER_PLUGINS.items() if kind in bases), "")
            if isinstance(item, str):
                hint = f": a precision name goes to precision={item!r}"
            value = (
                show(item) if isinstance(item, (str, int, float)) else f"an instance of {type(item).__name__}"
            )
            raise TypeError(
                f"plugins holds {value}, which is not a plugin ember takes{hint}. Valid choices: an "
                "ember.precision.Precision instance (MixedPrecision, HalfPrecision, DoublePrecision, ...), "
                "or a list holding one"
            )
    if len(items) > 1:
        raise ValueError(f"plugins={show(plugins)} holds {len(items)} precision plugins: pass one")
    if items and precision is not None:
        raise ValueError(
            f"precision={show(precision)} and plugins={show(plugins)} both set the precision: choose one"
        )
    return items[0] if items else precision


def parse_duration(value: str | timedelta | dict[str, int], name: str = "max_time") -> timedelta:
    """``"DD:HH:MM:SS"``, a :class:`~datetime.timedelta`, or ``timedelta`` keywords as a dict;
    ``name``: the argument an error names."""
    duration = None
    try:
        if isinstance(value, timedelta):
            duration = value
        elif isinstance(value, dict):
            duration = timedelta(**value)
        elif isinstance(value, str) and re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", value):
            days, hours, minutes, seconds = (int(p) for p in value.split(":"))
            duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (TypeError, ValueError, OverflowError) as err:  # unknown keys, NaN, past timedelta.max
        raise ValueError(f"{name}={show(value)}: {err}") from None
    if duration is not None and duration >= timedelta(0):
        return duration
    raise ValueError(
        f"{name}={show(value)} must be 'DD:HH:MM:SS', a datetime.timedelta, or a dict such as "
        "{'hours': 2}, and not negative"
    )


def _check_val_interval(interval: Any) -> timedelta | None:
    """``val_check_interval`` checked; its duration when it is a time, else None."""
    cause: ValueError | None = None
    if isinstance(interval, (str, timedelta, dict)):
        try:
            return parse_duration(interval, "val_check_interval")
        except ValueError as err:  # (its message names only the forms of a time)
            cause = err
    elif not isinstance(interval, bool) and (
        (isinstance(interval, int) and interval >= 1)
        or (isinstance(interval, float) and 0.0 < interval <= 1.0)
    ):
        return None
    raise ValueError(
        f"val_check_interval={show(interval)} must be an int >= 1 (every N training batches), a float in "
        "(0.0, 1.0] (a fraction of the epoch), or a time that is not negative: 'DD:HH:MM:SS', a "
        "datetime.timedelta, or a dict such as {'minutes': 30}"
    ) from cause


def resolve_limit(limit: int | float, available: int | float) -> int | float:
    """Batches to run: an int is a count, a float a fraction of ``available`` (which may be infinite)."""
    if isinstance(limit, int):
        return min(limit, available)
    if math.isinf(available):
        return available if limit == 1.0 else 0
    return int(available * limit) if limit < 1.0 else available


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    accelerator: str | None = None  # None: ember launch's --accelerator, else "auto"
    strategy: Any = None  # None: ember launch's --strategy, else "auto"
    devices: int | str | Sequence[int] = "auto"
    num_nodes: int = 1
    precision: Any = None  # None: ember launch's --precision, else "32-true"
    max_epochs: int | None = None
    max_steps: int = -1
    min_epochs: int | None = None  # should_stop (EarlyStopping ...) waits until both are reached
    min_steps: int | None = None
    max_time: str | timedelta | dict[str, int] | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None  # None: "norm" (the hook gets None, as in Lightning)
    # batches (an int), a fraction of the epoch (a float), or wall-clock time: "DD:HH:MM:SS", a timedelta, a dict
    val_check_interval: int | float | str | timedelta | dict[str, int] = 1.0
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    limit_predict_batches: int | float = 1.0
    num_sanity_val_steps: int = 2
    fast_dev_run: bool | int = False
    log_every_n_steps: int = 50
    callbacks: list[Any] | Any | None = None
    logger: Any = True
    enable_checkpointing: bool = True
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_autolog_hparams: bool = True  # the hyper-parameters to the loggers at each stage's start
    default_root_dir: str | os.PathLike[str] | None = None
    # torch.use_deterministic_algorithms: True, "warn" (warn_only) or False (off); None: left as it is
    deterministic: bool | str | None = None
    detect_anomaly: bool = False
    use_distributed_sampler: bool = True
    seed: int | None = None
    auto_resume: bool | None = None  # None: when the launcher restarted the processes (restart_count > 0)
    non_finite: str | None = "stop"  # mode of the default NonFiniteGuard; None: no guard
    collective_timeout: float | timedelta | None = DEFAULT_COLLECTIVE_TIMEOUT  # the watchdog; None: off
    overfit_batches: int | float = 0.0  # > 0: the same first batches every epoch, for training and validation
    benchmark: bool | None = (
        None  # torch.backends.cudnn.benchmark (None: left as it is, False if deterministic)
    )
    inference_mode: bool = True  # evaluation under torch.inference_mode (else torch.no_grad)
    sync_batchnorm: bool = False  # BatchNorm layers -> torch.nn.SyncBatchNorm on several processes
    reload_dataloaders_every_n_epochs: int = 0  # > 0: ask the module / DataModule for new training data
    # "simple", "advanced", "pytorch", a Profiler or None; resolved to a Profiler instance or None
    profiler: Any = None
    # Lightning's plugins=: a Precision instance (or a list holding one), the same as precision=
    plugins: Any = None
    barebones: bool = False  # every feature that costs step time off, to measure the loop itself
    duration: timedelta | None = field(default=None, init=False)
    val_check_time: timedelta | None = field(default=None, init=False)  # a time-based val_check_interval

    def __post_init__(self) -> None:
        check_bool("barebones", self.barebones)
        _int("num_nodes", self.num_nodes, 1)
        if self.max_epochs is not None:
            _int("max_epochs", self.max_epochs, -1)
        _int("max_steps", self.max_steps, -1)
        for name in ("min_epochs", "min_steps"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        _int("accumulate_grad_batches", self.accumulate_grad_batches, 1)
        check_number("gradient_clip_val", self.gradient_clip_val, minimum=0, finite=False, optional=True)
        if isinstance(self.gradient_clip_algorithm, str):  # as Lightning: "Norm" and "VALUE" too
            self.gradient_clip_algorithm = self.gradient_clip_algorithm.lower()
        if self.gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm={self.gradient_clip_algorithm!r}. Valid choices: 'norm', 'value'"
            )
        self.val_check_time = _check_val_interval(self.val_check_interval)
        if self.check_val_every_n_epoch is not None:
            _int("check_val_every_n_epoch", self.check_val_every_n_epoch, 1)
        elif isinstance(self.val_check_interval, float):
            raise ValueError(
                f"check_val_every_n_epoch=None counts training batches across epochs, so val_check_interval "
                f"must be an int, not {self.val_check_interval!r}, or a time ('DD:HH:MM:SS', a timedelta, a dict)"
            )
        for name in (
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "limit_predict_batches",
        ):
            _limit(name, getattr(self, name))
        _int("num_sanity_val_steps", self.num_sanity_val_steps, -1)
        _int("log_every_n_steps", self.log_every_n_steps, 1)
        if not isinstance(self.fast_dev_run, bool):
            _int("fast_dev_run", self.fast_dev_run, 0)
        if self.non_finite not in ("stop", "skip", None):
            raise ValueError(f"non_finite={self.non_finite!r}. Valid choices: 'stop', 'skip', None")
        check_collective_timeout(self.collective_timeout)
        check_choice("deterministic", self.deterministic, (None, True, False, "warn"))
        for name in (
            "enable_checkpointing",
            "enable_progress_bar",
            "enable_model_summary",
            "enable_autolog_hparams",
            "detect_anomaly",
            "use_distributed_sampler",
            "inference_mode",
            "sync_batchnorm",
        ):
            check_bool(name, getattr(self, name))
        check_bool("benchmark", self.benchmark, optional=True)
        _int("reload_dataloaders_every_n_epochs", self.reload_dataloaders_every_n_epochs, 0)
        _limit("overfit_batches", self.overfit_batches)
        if self.overfit_batches:  # Lightning's: the same batches (unshuffled) for training and validation
            self.limit_train_batches = self.limit_val_batches = self.overfit_batches
        check_path("default_root_dir", self.default_root_dir, optional=True)
        self._check_logger()
        if self.auto_resume is not None and not isinstance(self.auto_resume, bool):
            raise ValueError(f"auto_resume={self.auto_resume!r}. Valid choices: None, True, False")
        if self.max_time is not None:
            self.duration = parse_duration(self.max_time)
        self.profiler = resolve_profiler(self.profiler)  # the loops wrap their calls only when set
        self.precision = _precision_of_plugins(self.plugins, self.precision)
        if self.fast_dev_run:
            batches = 1 if self.fast_dev_run is True else int(self.fast_dev_run)
            self.max_epochs, self.max_steps, self.num_sanity_val_steps = 1, batches, 0
            self.limit_train_batches = self.limit_val_batches = batches
            self.limit_test_batches = self.limit_predict_batches = batches
            self.val_check_interval, self.val_check_time = 1.0, None  # (as Lightning: no time check)
        if self.max_epochs is None:  # (the Trainer warns when the 1000 applies, as Lightning)
            self.max_epochs = (
                -1 if (self.max_steps != -1 or self.duration is not None or self._timed()) else 1000
            )

    def _timed(self) -> bool:
        """A ``Timer`` among the callbacks: it bounds the fit (Lightning's test for an epoch limit)."""
        from ember.callbacks.timer import Timer  # (the callbacks import the trainer)

        return any(isinstance(c, Timer) for c in as_list(self.callbacks))

    def _check_logger(self) -> None:
        from ember.trainer.loggers.base import Logger  # (imported here: the loggers import the trainer)

        items = self.logger if isinstance(self.logger, (list, tuple)) else [self.logger]
        if not (
            self.logger is None
            or isinstance(self.logger, bool)
            or all(isinstance(item, Logger) for item in items)
        ):
            raise TypeError(
                f"logger={show(self.logger)} must be True, False, None, an ember Logger (CSVLogger, ...) "
                "or a list of them"
            )

    @classmethod
    def check_names(cls, names: list[str]) -> None:
        """A misspelled argument is a TypeError that suggests the closest valid name."""
        valid = [f.name for f in fields(cls) if f.init]
        for name in names:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid arguments: {', '.join(valid)}"
            raise TypeError(f"Trainer() got an unexpected argument {name!r}.{hint}")


def check_sync_batchnorm(config: TrainerConfig) -> None:
    """torch's SyncBatchNorm runs on GPUs only: refuse it on several CPU processes up front."""
    if not config.sync_batchnorm:
        return
    requested = config.accelerator or launch_defaults().get("accelerator") or "auto"
    on_cpu = requested == "cpu" or (requested == "auto" and not torch.cuda.is_available())
    several = (
        detect_environment().world_size > 1 or config.num_nodes > 1 or config.devices not in (1, "1", "auto")
    )
    if on_cpu and several:
        raise ValueError(
            f"sync_batchnorm=True synchronizes BatchNorm with torch.nn.SyncBatchNorm, which runs on GPUs only, "
            f"and this run uses several CPU processes (accelerator={requested!r}, devices={config.devices!r}); "
            "set sync_batchnorm=False there"
        )


# The Trainer's switches that None leaves at their default (Lightning's signature), and that
# barebones=True turns off: (default, barebones value).
_SWITCHES: dict[str, tuple[Any, Any]] = {
    "enable_checkpointing": (True, False),
    "logger": (True, False),
    "enable_progress_bar": (True, False),
    "enable_model_summary": (True, False),
    "num_sanity_val_steps": (2, 0),
    "log_every_n_steps": (50, 50),  # (no row is written: nothing is logged)
}


# Arguments whose Lightning default is None, meaning the same as ember's default (a LightningCLI
# config lists them as null): None reads as that default.
_NONE_MEANS_DEFAULT: dict[str, Any] = {
    "limit_train_batches": 1.0,
    "limit_val_batches": 1.0,
    "limit_test_batches": 1.0,
    "limit_predict_batches": 1.0,
    "val_check_interval": 1.0,
}


def resolve_switches(arguments: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's ``arguments`` with its switches left at None set: to their default, or under
    ``barebones=True`` to off, where a setting that turns a feature on is refused (Lightning's rule;
    ember's non-finite guard is off too, and refused in ``"skip"`` mode, its non-default)."""
    resolved = dict(arguments)
    for name, default in _NONE_MEANS_DEFAULT.items():
        if name in resolved and resolved[name] is None:
            resolved[name] = default
    barebones = resolved.get("barebones", False)
    check_bool("barebones", barebones)
    if barebones:
        conflicting = [name for name in _SWITCHES if resolved.get(name) not in (None, _SWITCHES[name][1])]
        conflicting += [
            name
            for name, on in (
                ("fast_dev_run", resolved.get("fast_dev_run") not in (False, 0)),
                ("detect_anomaly", resolved.get("detect_anomaly") is True),
                ("profiler", resolved.get("profiler") is not None),
                ("non_finite", resolved.get("non_finite") == "skip"),
            )
            if on
        ]
        if conflicting:
            name = conflicting[0]
            raise ValueError(
                f"Trainer(barebones=True, {name}={show(resolved[name])}): barebones turns off every feature "
                f"that costs step time, {name} among them; leave {name} unset, or drop barebones=True"
            )
        resolved["non_finite"] = None  # the non-finite guard's checks cost step time too
    for name, (default, off) in _SWITCHES.items():
        if resolved.get(name) is None:
            resolved[name] = off if barebones else default
    return resolved


def as_list(value: Any) -> list[Any]:
    """``value`` as a list: None is empty, a list or tuple is copied, anything else is one item."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_loggers(logger: Any, root: str) -> list[Logger]:
    """The ``logger=`` argument as loggers: True is a ``CSVLogger`` under ``root``, False or None none."""
    if logger is True:
        return [CSVLogger(root)]
    if logger in (False, None):
        return []
    loggers = as_list(logger)
    for item in loggers:
        if not isinstance(item, Logger):
            raise TypeError(f"logger={item!r} is not an ember Logger (CSVLogger, ...) nor True/False")
    return loggers
