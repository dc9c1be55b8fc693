"""``log_model``: when and which of ``ModelCheckpoint``'s checkpoints a logger uploads (W&B, MLflow,
Comet), and whether a resumed fit continues the run its checkpoint names. Each logger says only how
one checkpoint goes up (``_upload_checkpoint``)."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ember.strategies.checkpoint_io import MANIFEST
from ember.trainer.loggers.base import Logger

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["UploadsCheckpoints", "check_log_model", "checkpoint_score"]


def check_log_model(owner: str, log_model: Any) -> None:
    if not any(log_model is choice for choice in (True, False)) and log_model != "all":
        raise ValueError(f"{owner}(log_model={log_model!r}): valid choices are False, True, 'all'")


def checkpoint_score(callback: ModelCheckpoint, path: str) -> float | None:
    """The monitored score of a kept checkpoint, as a float (JSON metadata), or None."""
    kept = callback.best_k_models.get(path) if callback.monitor is not None else None
    return None if kept is None else float(kept)


class UploadsCheckpoints(Logger):
    """A logger with ``log_model``: ``False``; ``True`` uploads the checkpoints ``ModelCheckpoint``
    kept at the end of a successful fit (each as it is saved when it keeps them all,
    ``save_top_k=-1``); ``"all"`` each as it is saved. A checkpoint is uploaded again only when
    it was rewritten (its manifest's mtime changed); ``_logged_checkpoints`` goes in the logger's
    checkpoint state."""

    def _start_uploads(self, log_model: bool | str) -> None:
        self._log_model = log_model
        self._checkpoint_callback: ModelCheckpoint | None = None
        self._logged_checkpoints: dict[str, float] = {}  # path -> manifest mtime, once uploaded

    @abstractmethod
    def _upload_checkpoint(self, callback: ModelCheckpoint, path: str) -> None:
        """Upload the checkpoint directory ``path`` of ``callback``."""

    @override
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if self._log_model == "all" or (self._log_model is True and checkpoint_callback.save_top_k == -1):
            self._upload_new(checkpoint_callback)  # every checkpoint is kept: upload it now
        elif self._log_model is True:
            self._checkpoint_callback = checkpoint_callback  # upload the survivors at the end

    def _upload_new(self, callback: ModelCheckpoint) -> None:
        """Upload the callback's checkpoints not uploaded yet (or rewritten since), oldest first."""
        new = []
        for path in dict.fromkeys([*callback.best_k_models, callback.last_model_path]):
            manifest = Path(path) / MANIFEST
            if path and manifest.exists() and self._logged_checkpoints.get(path) != manifest.stat().st_mtime:
                new.append((manifest.stat().st_mtime, path))
        for mtime, path in sorted(new):
            self._upload_checkpoint(callback, path)
            self._logged_checkpoints[path] = mtime

    def _resume(
        self,
        state: dict[str, Any],
        run: str,
        saved_id: str,
        *,
        place: tuple[str, Any, Any],
        given: tuple[str, str | None],
        open_id: str | None,
    ) -> bool:
        """Whether this logger continues the checkpoint's ``run`` (``"W&B run"``, ...) ``saved_id``; if
        so its uploaded checkpoints are restored, else a warning says why not. Not when the run lives
        elsewhere (``place``: what, the checkpoint's, this logger's), the user gave another id
        (``given``: its name, the id or None), or another run is already open (``open_id``)."""
        noun = run.rsplit(" ", 1)[-1]
        (where, saved_place, our_place), (id_name, given_id) = place, given
        if saved_place != our_place:
            reason = f"the checkpoint's {noun} is in {where} {saved_place!r}, this logger's in {our_place!r}"
        elif given_id is not None and given_id != saved_id:
            reason = f"this logger was given the {id_name} {given_id!r}"
        elif open_id is not None and open_id != saved_id:
            reason = f"this logger's {noun} {open_id!r} is already open"
        else:
            self._logged_checkpoints = dict(state["logged_checkpoints"])
            return True
        warnings.warn(f"not continuing the checkpoint's {run} {saved_id!r}: {reason}", stacklevel=3)
        return False

    def _finish_uploads(self, status: str) -> None:
        """At the end of a run: the kept checkpoints go up after a successful fit (``log_model=True``)."""
        if status == "success" and self._checkpoint_callback is not None:
            self._upload_new(self._checkpoint_callback)
        self._checkpoint_callback = None
