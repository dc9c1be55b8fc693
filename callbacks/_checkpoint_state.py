"""What ``ModelCheckpoint`` keeps in a checkpoint: the kept checkpoints, their scores and the best,
the ``last`` path and where it saves; restored only where the directory is the same."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ember.callbacks import _checkpoint_names as _names

if TYPE_CHECKING:
    from ember.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["load_state", "state_of"]


def state_of(callback: ModelCheckpoint) -> dict[str, Any]:
    """``callback.state_dict()``."""
    # Scores are kept as tensors (as in Lightning) and saved as floats (a checkpoint's JSON).
    score = callback.best_model_score
    return {
        "best_k_models": {path: float(value) for path, value in callback.best_k_models.items()},
        "best_model_path": callback.best_model_path,
        "best_model_score": None if score is None else float(score),
        "last_model_path": callback.last_model_path,
        "last_step_saved": callback._last_step_saved,
        "dirpath": callback.dirpath,
        # A checkpoint saved between a batch whose save waits for validation and that validation
        # (ModelCheckpoint's own, or another callback's): the resumed fit saves it there too.
        "deferred": callback._deferred,
        "validated": callback._validated,
    }


def load_state(callback: ModelCheckpoint, state_dict: dict[str, Any]) -> None:
    """``callback.load_state_dict(state_dict)``."""
    callback.best_model_path = state_dict["best_model_path"]
    callback._last_step_saved = state_dict["last_step_saved"]
    callback._deferred = state_dict.get("deferred", False)  # (older checkpoints hold neither)
    callback._validated = state_dict.get("validated", False)
    saved_in = state_dict.get("dirpath", callback.dirpath)  # (older checkpoints: assume the same)
    if not _names.same_directory(saved_in, callback.dirpath):
        # As Lightning: the kept checkpoints are another directory's: neither ranked against nor removed.
        warnings.warn(
            f"The dirpath has changed from {saved_in!r} to {callback.dirpath!r}, therefore `best_model_score`, "
            "`kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models` won't be reloaded. "
            "Only `best_model_path` will be reloaded.",
            stacklevel=3,
        )
        return
    score = state_dict["best_model_score"]
    callback.best_k_models = {
        path: _names.as_score(float(value)) for path, value in state_dict["best_k_models"].items()
    }
    callback.best_model_score = None if score is None else _names.as_score(float(score))
    callback.last_model_path = state_dict["last_model_path"]
