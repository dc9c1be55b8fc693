"""The logger interface: small, so CSV, W&B and TensorBoard loggers are each one file."""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from argparse import Namespace
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from typing_extensions import override

from ember._validation import show
from ember.strategies.environment import detect_environment

if TYPE_CHECKING:
    from torch import nn

    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["Logger", "share_versions"]


class Logger(ABC):
    """Receives hyper-parameters and metric rows from the Trainer, on global rank 0 only.

    Metrics arrive as Python floats, at most every ``log_every_n_steps`` batches plus once per
    epoch/validation run: a logger never forces a device sync of its own.
    """

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def version(self) -> int | str: ...

    @property
    def log_dir(self) -> str | None:
        """Directory of this run's files, if the logger writes any."""
        return None

    @property
    def save_dir(self) -> str | None:
        """The directory the logger was given to write under, if any (Lightning's ``save_dir``)."""
        return None

    @property
    def group_separator(self) -> str:
        """What joins a metric group's name to a metric's (Lightning's name): W&B and TensorBoard show
        ``"/"``-joined names as groups."""
        return "/"

    @property
    def tracker(self) -> Any:
        """The object this logger writes through, as 🤗 Accelerate's trackers name it (what
        ``accelerator.get_tracker(name, unwrap=True)`` returns): its ``experiment`` (a
        ``SummaryWriter``, a wandb run, an ``MlflowClient``, a comet experiment), else the logger itself."""
        return getattr(self, "experiment", self)

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_text(self, texts: dict[str, str], step: int) -> None:
        """Record strings at ``step`` (``accelerator.log`` with string values). The built-in loggers
        write them (a CSV column, a TensorBoard text summary, a W&B history field); a logger of
        your own that does not override this refuses them rather than drop them."""
        raise TypeError(
            f"{type(self).__name__} cannot log text ({sorted(texts)}): override log_text to record strings"
        )

    def save(self) -> None:
        """Flush buffered rows (called before every checkpoint and at the end of a run)."""
        return None

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted")."""
        self.save()

    def finish(self) -> None:
        """The whole job ended (``Accelerator.end_training()``, as 🤗 Accelerate's ``tracker.finish()``):
        :meth:`finalize` with "success", and release what a logger keeps open between stages."""
        self.finalize("success")

    def log_graph(self, model: nn.Module, input_array: Any = None) -> None:
        """Record ``model``'s graph, traced with ``input_array`` (default: its ``example_input_array``).
        The Trainer calls it on global rank 0 at the start of each stage, after ``log_hyperparams``
        (as Lightning); only ``TensorBoardLogger(log_graph=True)`` records one."""
        return None

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """``checkpoint_callback`` has just saved (and pruned) checkpoints; e.g. upload them."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this run's log (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run described by ``state`` (called when fit resumes from a checkpoint)."""
        return None


class VersionedLogger(Logger):
    """A logger writing ``<save_dir>/<name>/version_N/``: the next free N unless a version is given.

    Subclasses set ``_save_dir`` (a Path), ``_name``, ``_version`` (None: not chosen yet),
    ``_given_version`` (the ``version`` argument) and ``_hparams`` (an empty dict).
    """

    _save_dir: Path
    _name: str
    _version: int | str | None
    _given_version: int | str | None
    _hparams: dict[str, Any]

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = _next_version(self._save_dir / self._name)
        return self._version

    @property
    @override
    def save_dir(self) -> str:
        """The ``save_dir`` argument (Lightning's name)."""
        return str(self._save_dir)

    @property
    def root_dir(self) -> str:
        """``<save_dir>/<name>``: where the versions are."""
        return str(self._save_dir / self._name)

    @property
    @override
    def log_dir(self) -> str:
        return str(self._log_dir_of(self.version))

    def _log_dir_of(self, version: int | str) -> Path:
        """The folder of ``version``'s files."""
        return self._save_dir / self._name / _version_folder(version)

    def _write_hparams(self, params: Any) -> None:
        """``hparams.json``: ``params`` over those of the earlier calls (as Lightning's ``hparams.yaml``, so a
        ``log_hyperparams({"config": ...})`` after the Trainer's keeps the module's too)."""
        self._hparams.update(_params(params))
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.log_dir) / "hparams.json").write_text(
            json.dumps(self._hparams, indent=2, sort_keys=True, default=repr)
        )

    def _continues(self, state: dict[str, Any]) -> bool:
        """Whether to continue the checkpoint's run (``state``: its version and log directory): only when
        it logged to this logger's directory and no other version was given; else warn why not."""
        version, log_dir = state["version"], state["log_dir"]
        given = self._given_version
        if given is not None and _version_folder(given) != _version_folder(version):
            reason = f"this logger was given version={given!r}"
        elif self._log_dir_of(version).resolve() != Path(log_dir):
            reason = "that is not this logger's directory"
        else:
            return True
        # (Never touch that run's files from here.)
        warnings.warn(
            f"the checkpoint's run logged to {log_dir}, and {reason}: this run logs to {self.log_dir} from its start",
            stacklevel=3,
        )
        return False


class _NoExperiment:
    """What ``experiment`` is on ranks other than 0: every attribute is a call that does nothing."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NoExperiment:
        return self


def _is_global_zero() -> bool:
    """Global rank 0, also before the process group exists (read from the launcher's variables)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return detect_environment().rank == 0


def _next_version(root: Path) -> int:
    """The next free ``N`` of ``root/version_N``."""
    taken = [
        int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()
    ]
    return max(taken, default=-1) + 1


def _check_version(version: Any, owner: str) -> None:
    """``version``: None (the next free one), an int >= 0 (``version_N``), or a folder name."""
    if version is None or isinstance(version, str):
        return
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"{owner}(version={show(version)}) must be None, an int >= 0 or a folder name")
    if version < 0:
        raise ValueError(f"{owner}(version={version}) must be None, an int >= 0 or a folder name")


def _version_folder(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def share_versions(
    loggers: list[Logger], broadcast_object: Callable[[Any], Any], is_global_zero: bool
) -> None:
    """Several processes: each versioned logger takes global rank 0's version (the folder rank 0 writes),
    so ``logger.version``, ``log_dir`` and ``trainer.log_dir`` name the same folder on every rank, as
    Lightning's. ``broadcast_object``: rank 0's object, on every rank (a collective: all ranks call it)."""
    versioned = [logger for logger in loggers if isinstance(logger, VersionedLogger)]
    if versioned:
        versions = broadcast_object([logger.version for logger in versioned] if is_global_zero else None)
        for logger, version in zip(versioned, versions, strict=True):
            logger._version = version


def _params(params: Any) -> Any:
    """``params`` with every ``argparse.Namespace`` and mapping, at any depth, as a plain dict (as Lightning's
    loggers take ``log_hyperparams(args)``)."""
    if isinstance(params, Namespace):
        params = vars(params)
    if isinstance(params, Mapping):
        return {key: _params(value) for key, value in params.items()}
    return params


def _flatten(params: dict[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested dicts become ``"outer/inner"`` keys (the way W&B and TensorBoard show groups)."""
    flat: dict[str, Any] = {}
    for key, value in _params(params).items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat
