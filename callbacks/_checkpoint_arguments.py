"""``ModelCheckpoint``'s arguments: each checked on its own, then the combinations it refuses."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from ember._validation import check_bool, check_path, check_str
from ember.callbacks._checkpoint_names import check_save_last

__all__ = ["check_arguments"]


def check_arguments(
    *,
    dirpath: str | Path | None,
    filename: str | None,
    monitor: str | None,
    mode: str,
    save_top_k: int,
    save_last: bool | None,
    every_n_train_steps: int | None,
    every_n_epochs: int | None,
    auto_insert_metric_name: bool,
    save_on_train_epoch_end: bool | None,
    verbose: bool,
    save_weights_only: bool,
    train_time_interval: timedelta | None,
    enable_version_counter: bool,
    save_on_exception: bool,
) -> None:
    """Raise on the first argument of ``ModelCheckpoint(...)`` that is invalid, naming it, its value
    and what it may be."""
    if mode not in ("min", "max"):
        raise ValueError(f"ModelCheckpoint(mode={mode!r}): valid choices are 'min', 'max'")
    if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
        raise ValueError(
            f"ModelCheckpoint(save_top_k={save_top_k!r}) must be -1 (all), 0 (none) or a positive int"
        )
    for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"ModelCheckpoint({name}={value!r}) must be None, 0 (off) or an int >= 1")
    check_path("dirpath", dirpath, owner="ModelCheckpoint", optional=True)
    check_str("filename", filename, owner="ModelCheckpoint", optional=True)
    check_str("monitor", monitor, owner="ModelCheckpoint", optional=True)
    check_save_last(save_last)
    check_bool("auto_insert_metric_name", auto_insert_metric_name, owner="ModelCheckpoint")
    check_bool("save_on_train_epoch_end", save_on_train_epoch_end, owner="ModelCheckpoint", optional=True)
    for name, flag in (
        ("verbose", verbose),
        ("save_weights_only", save_weights_only),
        ("enable_version_counter", enable_version_counter),
        ("save_on_exception", save_on_exception),
    ):
        check_bool(name, flag, owner="ModelCheckpoint")
    if train_time_interval is not None and (
        not isinstance(train_time_interval, timedelta) or train_time_interval < timedelta(0)
    ):  # (0, as in Lightning: a checkpoint after every training batch)
        raise ValueError(
            f"ModelCheckpoint(train_time_interval={train_time_interval!r}) must be None or a "
            "datetime.timedelta >= 0"
        )
    given = {
        "every_n_train_steps": every_n_train_steps,
        "every_n_epochs": every_n_epochs,
        "train_time_interval": train_time_interval,
    }
    if sum(bool(value) for value in given.values()) > 1:  # (None and 0 are off)
        raise ValueError(
            "ModelCheckpoint: "
            + ", ".join(f"{k}={v!r}" for k, v in given.items() if v)
            + " are exclusive: give one of every_n_train_steps, every_n_epochs, train_time_interval"
        )
    if monitor is None and save_top_k > 1:
        raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}) ranks checkpoints and needs monitor=")
