"""How ``ModelCheckpoint`` names its checkpoint directories: templates filled from the logged
values, ``-vN`` past the names already taken, and the checks of how ``last`` is named and made;
with the small helpers of its bookkeeping (scores, removal, the verbose line)."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ember._validation import check_bool
from ember.strategies.checkpoint_io import MANIFEST
from ember.strategies.checkpoint_swap import remove_checkpoint

__all__ = [
    "as_score",
    "check_class_names",
    "check_save_last",
    "checkpoint_name",
    "fill_template",
    "free_path",
    "is_version_of",
    "last_path",
    "metrics_of",
    "remove_checkpoints",
    "report",
    "same_directory",
    "template_fields",
    "warn_if_not_empty",
]

_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


def fill_template(
    template: str, where: str, metrics: dict[str, float], epoch: int, step: int, insert_names: str | None
) -> str:
    """``template``'s ``{name}`` / ``{name:format}`` fields filled from ``epoch``, ``step`` and
    ``metrics`` (``name=value`` when ``insert_names`` is ``"="``; ``None``: the value alone); ``/``
    becomes ``_``. ``where`` names the template in the error for a field that was never logged."""
    values = {"epoch": epoch, "step": step, **metrics}

    def field(match: re.Match[str]) -> str:
        name, spec = match.group(1), (match.group(2) or ":")[1:]
        if name not in values:
            raise KeyError(f"{where} uses {name!r}, which was not logged. Logged metrics: {sorted(metrics)}")
        text = format(values[name], spec)
        return f"{name}{insert_names}{text}" if insert_names is not None else text

    return _FIELD.sub(field, template).replace("/", "_")


def template_fields(template: str) -> list[str]:
    """The names of ``template``'s fields: ``"{epoch}-{val_loss:.2f}"`` -> ``["epoch", "val_loss"]``."""
    return [match.group(1) for match in _FIELD.finditer(template)]


def checkpoint_name(
    callback: Any, metrics: Mapping[str, Any], filename: str | None, ver: int | None, prefix: str | None
) -> str:
    """``ModelCheckpoint.format_checkpoint_name``: ``dirpath/[prefix-]<template filled>[-v<ver>]``,
    with ``epoch`` and ``step`` taken from ``metrics`` (0 when absent, as Lightning's)."""
    template = filename or callback.filename
    values = {name: float(value) for name, value in metrics.items()}
    epoch, step = int(values.pop("epoch", 0)), int(values.pop("step", 0))
    where = f"ModelCheckpoint.format_checkpoint_name(filename={template!r})"
    insert = callback.CHECKPOINT_EQUALS_CHAR if callback.auto_insert_metric_name else None
    name = fill_template(template, where, values, epoch, step, insert)
    name = f"{prefix}-{name}" if prefix else name
    name = f"{name}-v{ver}" if ver is not None else name
    return os.path.join(callback.dirpath, name) if callback.dirpath else name


def last_path(callback: Any, trainer: Any, metrics: dict[str, float] | None, also_taken: list[str]) -> str:
    """``ModelCheckpoint.last_path``."""
    metrics = metrics_of(trainer) if metrics is None else metrics
    template, epoch, step = callback.last_name, trainer.current_epoch, trainer.global_step
    where = f"ModelCheckpoint.CHECKPOINT_NAME_LAST={template!r}"
    insert = callback.CHECKPOINT_EQUALS_CHAR if callback.auto_insert_metric_name else None
    name = fill_template(template, where, metrics, epoch, step, insert)
    if callback.last_model_path and is_version_of(Path(callback.last_model_path).name, name):
        return str(callback.last_model_path)
    taken = {*callback.best_k_models, *also_taken}
    directory = Path(callback.resolved_dirpath(trainer))
    return str(free_path(directory, name, taken, callback.enable_version_counter))


def free_path(
    directory: Path, name: str, taken: set[str], version_counter: bool, replaceable: str = ""
) -> Path:
    """``directory/name``, or ``name-v1``, ``name-v2``... past the paths this run keeps (``taken``)
    and what exists: any checkpoint of another run too, unless ``version_counter`` is False (then
    only what is not a checkpoint; a checkpoint of the same name is replaced). ``replaceable``, a
    checkpoint of this run that the new one supersedes, is free."""
    path, version = directory / name, 0
    while str(path) != replaceable and (
        str(path) in taken or (path.exists() and (version_counter or not (path / MANIFEST).exists()))
    ):
        version += 1
        path = directory / f"{name}-v{version}"
    return path


def is_version_of(existing: str, name: str) -> bool:
    """Whether the checkpoint name ``existing`` is ``name`` or one of its ``name-vN``."""
    return re.fullmatch(rf"{re.escape(name)}(-v\d+)?", existing) is not None


def same_directory(a: str | None, b: str | None) -> bool:
    """Whether the directories ``a`` and ``b`` (``None``: not known) are the same one."""
    return a == b or (a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b))


def check_class_names(callback: Any) -> None:
    """``CHECKPOINT_NAME_LAST`` must be a non-empty name template, ``FILE_EXTENSION`` ``""`` and
    Lightning's other name attributes valid (set on the class or an instance, so checked when the
    callback is set up)."""
    last = callback.last_name  # CHECKPOINT_NAME_LAST, or a subclass's `last_name` (ember's earlier name)
    if not isinstance(last, str) or not last or "/" in last:
        raise ValueError(
            f"ModelCheckpoint.CHECKPOINT_NAME_LAST={last!r} must be a non-empty name template without '/', "
            "such as 'last' or '{epoch}-last'"
        )
    equals = callback.CHECKPOINT_EQUALS_CHAR
    if not isinstance(equals, str) or "/" in equals:
        raise ValueError(f"ModelCheckpoint.CHECKPOINT_EQUALS_CHAR={equals!r} must be a string without '/'")
    for name, only in (("CHECKPOINT_JOIN_CHAR", "-"), ("STARTING_VERSION", 1)):
        if getattr(callback, name) != only:
            raise ValueError(
                f"ModelCheckpoint.{name}={getattr(callback, name)!r}: ember names versions '<name>-v1', "
                f"'-v2', ...; the only valid value is {only!r}"
            )
    if callback.FILE_EXTENSION != "":
        raise ValueError(
            f"ModelCheckpoint.FILE_EXTENSION={callback.FILE_EXTENSION!r}: ember's checkpoints are directories, "
            "named without an extension; the only valid value is ''"
        )


def check_save_last(save_last: Any) -> None:
    """``save_last`` is True, False or None. Lightning's ``"link"`` (``last`` a symbolic link to the
    newest checkpoint) is refused: ember swaps a checkpoint directory into place atomically at every
    save into ``last`` (also a pre-emption's), which cannot replace a link; and ``save_last=True``
    already shares the new checkpoint's files (hard links) instead of writing them twice."""
    if isinstance(save_last, str) and save_last == "link":
        raise ValueError(
            "ModelCheckpoint(save_last='link'): valid choices are True, False and None. A save into `last` "
            "swaps a checkpoint directory into place atomically, which a symbolic link would break; "
            "save_last=True already makes `last` share the new checkpoint's files (hard links), with no second write"
        )
    check_bool("save_last", save_last, owner="ModelCheckpoint", optional=True)


def metrics_of(trainer: Any) -> dict[str, float]:
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def remove_checkpoints(paths: list[str]) -> None:
    for old in paths:
        if (Path(old) / MANIFEST).exists():
            remove_checkpoint(Path(old))  # hidden first: never seen half deleted


def as_score(value: float) -> torch.Tensor:
    """A score as Lightning keeps it: a 0-dim tensor on the CPU, float32 when that holds ``value``
    exactly (float64 otherwise)."""
    narrow = torch.tensor(value, dtype=torch.float32)
    return narrow if float(narrow) == value or math.isnan(value) else torch.tensor(value, dtype=torch.float64)


def report(callback: Any, trainer: Any, path: str | None, score: float | None) -> None:
    """``ModelCheckpoint(verbose=True)``'s line: what is saved and why (``path`` None: a monitored
    value that did not make the top ``save_top_k``)."""
    if path is None and score is None:
        return
    where = f"Epoch {trainer.current_epoch}, global step {trainer.global_step}"
    if path is None:
        message = f"{where}: {callback.monitor!r} was not in top {callback.save_top_k}"
    elif score is None:
        message = f"{where}: saving model to {path!r}"
    else:
        # (as Lightning: with save_top_k=-1, how many are kept now)
        top = len(callback.best_k_models) if callback.save_top_k == -1 else callback.save_top_k
        message = (
            f"{where}: {callback.monitor!r} reached {score:0.5f} (best {callback.best_model_score:0.5f}), saving "
            f"model to {path!r} as top {top}"
        )
    print(message, flush=True)


def warn_if_not_empty(callback: Any, trainer: Any, stage: str) -> None:
    """Lightning's warning, on global rank 0 at each fit's setup (resumed ones too) when a callback
    that may save (``save_top_k != 0``) finds its directory holding anything."""
    if stage != "fit" or not trainer.is_global_zero or callback.save_top_k == 0:
        return
    directory = Path(callback.dirpath)
    if directory.is_dir() and any(directory.iterdir()):
        warnings.warn(
            f"Checkpoint directory {directory} exists and is not empty.",
            stacklevel=3,  # (ModelCheckpoint.setup)
        )
