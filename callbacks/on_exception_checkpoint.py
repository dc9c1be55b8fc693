"""``OnExceptionCheckpoint``: save a checkpoint when the fit raises, to resume from where it failed."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from typing_extensions import override

from ember._validation import check_path, check_str
from ember.callbacks.base import Checkpoint

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["OnExceptionCheckpoint"]


class OnExceptionCheckpoint(Checkpoint):
    """When ``fit`` raises (``KeyboardInterrupt`` included), save a checkpoint directory at
    ``<dirpath>/<filename>`` through the Trainer's checkpointing, from which
    ``trainer.fit(module, ckpt_path=callback.ckpt_path)`` resumes: with the batch that failed
    (more exactly, the first training batch not finished), or the phase of the epoch's end that did.

    An existing path is never overwritten: the save goes to ``<filename>-v1``, ``-v2``, ... as
    ``ModelCheckpoint`` does; :attr:`ckpt_path` names the one written. On several processes it saves
    only when every process failed at the same point of the fit (a save is a collective: a process
    saving alone would wait for the others forever); otherwise it warns and saves nothing, and the
    processes end as any failure ends them. A pre-emption that already saved ``last`` saves no
    second copy.

    Example::

        trainer = Trainer(callbacks=[OnExceptionCheckpoint("checkpoints")])
        try:
            trainer.fit(module, loader)
        except RuntimeError:
            trainer.fit(module, loader, ckpt_path="checkpoints/on_exception")
    """

    #: How long a process that failed waits for the others to fail at the same point (capped at half
    #: the Trainer's ``collective_timeout``). One process: no wait.
    agree_seconds: ClassVar[float] = 30.0

    def __init__(self, dirpath: str | os.PathLike[str], filename: str = "on_exception") -> None:
        check_path("dirpath", dirpath, owner="OnExceptionCheckpoint")
        check_str("filename", filename, owner="OnExceptionCheckpoint")
        if not filename or filename in (".", "..") or "/" in filename or os.sep in filename:
            raise ValueError(
                f"OnExceptionCheckpoint(filename={filename!r}) must be a name for the checkpoint directory "
                "(not empty, no path separator): the directory goes in dirpath"
            )
        self.dirpath = str(dirpath)
        self.filename = filename
        self._saved = ""

    @property
    @override
    def state_key(self) -> str:
        return f"OnExceptionCheckpoint[dirpath={self.dirpath},filename={self.filename}]"

    @property
    def ckpt_path(self) -> str:
        """The checkpoint the last failure saved; before one did, ``<dirpath>/<filename>``."""
        return self._saved or os.path.join(self.dirpath, self.filename)

    @override
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        from ember.trainer.preemption import Preempted  # (the Trainer's modules import the callbacks)

        if trainer.stage != "fit" or (isinstance(exception, Preempted) and exception.checkpoint is not None):
            return
        if not failed_together(
            trainer, exception, "OnExceptionCheckpoint", self.filename, self.agree_seconds
        ):
            return
        path = self._free_path() if trainer.is_global_zero else ""
        if trainer.world_size > 1:  # rank 0 looked at the directory: every process saves there
            path = trainer.accelerator.broadcast_object(path)
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the fit's own exception is the one to raise
            warnings.warn(f"OnExceptionCheckpoint could not save {path!r}: {error}", stacklevel=2)
            return
        self._saved = path
        if trainer.is_global_zero:
            print(
                f"ember: the fit raised {type(exception).__name__}; OnExceptionCheckpoint saved {path} "
                f"(trainer.fit(..., ckpt_path={path!r}) resumes from it)",
                file=sys.stderr,
                flush=True,
            )

    def _free_path(self) -> str:
        """``<dirpath>/<filename>``, or ``-v1``, ``-v2``... past what exists (ModelCheckpoint's rule)."""
        path, version = Path(self.dirpath) / self.filename, 0
        while path.exists() or path.is_symlink():
            version += 1
            path = Path(self.dirpath) / f"{self.filename}-v{version}"
        return str(path)

    def __repr__(self) -> str:
        return f"OnExceptionCheckpoint(dirpath={self.dirpath!r}, filename={self.filename!r})"


def failed_together(
    trainer: Trainer, exception: BaseException, owner: str, key: str, seconds: float | None = None
) -> bool:
    """Whether every process failed at the same point of the fit, so that a checkpoint can be saved
    (a collective: one process cannot save alone while the others wait elsewhere); a warning on a
    process where not. ``owner`` names the caller in the warning, ``key`` tells its saves apart;
    ``seconds``: how long to wait for the others (None: ``OnExceptionCheckpoint.agree_seconds``)."""
    state = trainer.state
    point = (
        f"{owner}:{key}:epoch={state.epoch}:step={state.global_step}:batch={state.total_batch_idx}:"
        f"{int(state.train_done)}{int(state.val_done)}{int(state.epoch_done)}"
    )
    if trainer.strategy.all_arrive(
        point, OnExceptionCheckpoint.agree_seconds if seconds is None else seconds
    ):
        return True
    warnings.warn(
        f"{owner}: process {trainer.global_rank} failed ({type(exception).__name__}) where not every process "
        "did, so no checkpoint is saved: saving is a collective, which a process cannot run alone while the "
        "others wait elsewhere",
        stacklevel=3,
    )
    return False
