"""How ``ModelCheckpoint`` names its checkpoint directories: templates filled from the logged
values, ``-vN`` past the names already taken, and the checks of how ``last`` is named and made."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ember._validation import check_bool
from ember.strategies.checkpoint_io import MANIFEST

__all__ = ["check_class_names", "check_save_last", "fill_template", "free_path", "is_version_of"]

_FIELD = re.compile(r"\{([^{}:]+)(:[^{}]*)?\}")


def fill_template(
    template: str, where: str, metrics: dict[str, float], epoch: int, step: int, insert_names: bool
) -> str:
    """``template``'s ``{name}`` / ``{name:format}`` fields filled from ``epoch``, ``step`` and
    ``metrics`` (``name=value`` when ``insert_names``); ``/`` becomes ``_``. ``where`` names the
    template in the error for a field that was never logged."""
    values = {"epoch": epoch, "step": step, **metrics}

    def field(match: re.Match[str]) -> str:
        name, spec = match.group(1), (match.group(2) or ":")[1:]
        if name not in values:
            raise KeyError(f"{where} uses {name!r}, which was not logged. Logged metrics: {sorted(metrics)}")
        text = format(values[name], spec)
        return f"{name}={text}" if insert_names else text

    return _FIELD.sub(field, template).replace("/", "_")


def free_path(directory: Path, name: str, taken: set[str], version_counter: bool) -> Path:
    """``directory/name``, or ``name-v1``, ``name-v2``... past the paths this run keeps (``taken``)
    and what exists: any checkpoint of another run too, unless ``version_counter`` is False (then
    only what is not a checkpoint; a checkpoint of the same name is replaced)."""
    path, version = directory / name, 0
    while str(path) in taken or (path.exists() and (version_counter or not (path / MANIFEST).exists())):
        version += 1
        path = directory / f"{name}-v{version}"
    return path


def is_version_of(existing: str, name: str) -> bool:
    """Whether the checkpoint name ``existing`` is ``name`` or one of its ``name-vN``."""
    return re.fullmatch(rf"{re.escape(name)}(-v\d+)?", existing) is not None


def check_class_names(callback: Any) -> None:
    """``CHECKPOINT_NAME_LAST`` must be a non-empty name template and ``FILE_EXTENSION`` ``""``
    (set on the class or an instance, so checked when the callback is set up)."""
    last = callback.last_name  # CHECKPOINT_NAME_LAST, or a subclass's `last_name` (ember's earlier name)
    if not isinstance(last, str) or not last or "/" in last:
        raise ValueError(
            f"ModelCheckpoint.CHECKPOINT_NAME_LAST={last!r} must be a non-empty name template without '/', "
            "such as 'last' or '{epoch}-last'"
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
