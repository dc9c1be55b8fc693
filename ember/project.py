"""``ProjectConfiguration``: where an Accelerator's run keeps its logs and checkpoints (🤗 Accelerate's).

With ``automatic_checkpoint_naming=True``, ``accelerator.save_state()`` takes no directory: it writes
``<project_dir>/checkpoints/checkpoint_<iteration>`` and counts ``iteration`` up, keeps the newest
``total_limit`` of them, and ``accelerator.load_state()`` loads the newest.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

from ember._validation import check_bool, check_int, check_path

__all__ = ["ProjectConfiguration", "check_project"]

_NUMBERED = re.compile(r"checkpoint_(\d+)")


@dataclasses.dataclass
class ProjectConfiguration:
    """Where a run's logs and checkpoints go, as 🤗 Accelerate's class of the same name.

    - ``project_dir``: the run's directory (``Accelerator(project_dir=...)`` sets it too).
    - ``logging_dir``: where trackers write (``init_trackers``); ``None``: ``project_dir``.
    - ``automatic_checkpoint_naming``: ``save_state()`` without a directory writes
      ``<project_dir>/checkpoints/checkpoint_<iteration>``, then adds 1 to ``iteration``;
      ``load_state()`` without one loads the highest-numbered checkpoint there and sets
      ``iteration`` past it, so the next save does not collide with an existing one.
    - ``total_limit``: with automatic naming, how many numbered checkpoints to keep; the oldest are
      deleted once a new one is complete on disk (Accelerate deletes them before it saves: a save
      that fails there has already lost one).
    - ``iteration``: the number of the next automatically named checkpoint.
    - ``save_on_each_node``: ``accelerator.save()`` writes from the first process of every node
      (for machines that share no filesystem), not only from the main process. ``save_state``
      writes one directory that every process adds its files to, so it needs a shared filesystem
      and refuses this setting on several nodes.

    Example::

        config = ProjectConfiguration(project_dir="runs/a", automatic_checkpoint_naming=True, total_limit=3)
        accelerator = Accelerator(project_config=config)
        ...
        accelerator.save_state()  # runs/a/checkpoints/checkpoint_0, checkpoint_1, ...
    """

    project_dir: str | os.PathLike[str] | None = None
    logging_dir: str | os.PathLike[str] | None = None
    automatic_checkpoint_naming: bool = False
    total_limit: int | None = None
    iteration: int = 0
    save_on_each_node: bool = False

    def __post_init__(self) -> None:
        owner = "ProjectConfiguration"
        check_path("project_dir", self.project_dir, owner=owner, optional=True)
        check_path("logging_dir", self.logging_dir, owner=owner, optional=True)
        check_bool("automatic_checkpoint_naming", self.automatic_checkpoint_naming, owner=owner)
        check_bool("save_on_each_node", self.save_on_each_node, owner=owner)
        check_int("total_limit", self.total_limit, minimum=1, owner=owner, optional=True)
        check_int("iteration", self.iteration, minimum=0, owner=owner)
        self.set_directories(self.project_dir)

    def set_directories(self, project_dir: str | os.PathLike[str] | None = None) -> None:
        """Set ``project_dir``, and ``logging_dir`` to it when no logging directory was given."""
        self.project_dir = project_dir
        if self.logging_dir is None:
            self.logging_dir = project_dir

    # -- automatic checkpoint naming (the Accelerator's save_state / load_state) -------------------
    def checkpoints_dir(self, what: str) -> Path:
        if self.project_dir is None:
            raise ValueError(
                f"{what} without a directory uses automatic checkpoint naming, which needs a project "
                "directory: Accelerator(project_dir=...) or ProjectConfiguration(project_dir=...)"
            )
        return Path(self.project_dir).absolute() / "checkpoints"

    def next_checkpoint(self) -> Path:
        """Where the next automatically named checkpoint goes; an error if it exists already."""
        path = self.checkpoints_dir("save_state()") / f"checkpoint_{self.iteration}"
        if path.exists():
            raise ValueError(
                f"save_state(): {path} exists already (ProjectConfiguration.iteration={self.iteration}). "
                "Continue a run with load_state(), which sets the iteration past the newest checkpoint, "
                "or set accelerator.project_configuration.iteration to a number not used yet"
            )
        return path

    def latest_checkpoint(self) -> Path:
        """The highest-numbered checkpoint; sets ``iteration`` past it."""
        root = self.checkpoints_dir("load_state()")
        numbered = numbered_checkpoints(root)
        if not numbered:
            raise FileNotFoundError(
                f"load_state(): no checkpoint_<N> directory in {root} to load (automatic checkpoint naming)"
            )
        number, path = numbered[-1]
        self.iteration = max(self.iteration, number + 1)
        return path

    def prune(self) -> list[Path]:
        """Delete the oldest numbered checkpoints beyond ``total_limit``, never the one just saved
        (``iteration - 1``, which a run numbering from 0 next to an earlier run's higher numbers
        would otherwise lose at once); returns what was deleted."""
        if self.total_limit is None or self.project_dir is None:
            return []
        numbered = numbered_checkpoints(self.checkpoints_dir("save_state()"))
        others = [path for number, path in numbered if number != self.iteration - 1]
        keep = self.total_limit - (len(others) < len(numbered))  # room for the one just saved
        doomed = others[: max(0, len(others) - keep)]
        for path in doomed:
            shutil.rmtree(path)
        return doomed


def numbered_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """The complete ``checkpoint_<N>`` directories in ``root``, by number (a save in progress is
    staged under another name and is not listed)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NUMBERED.fullmatch(path.name)
        if match is not None and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def check_project(
    project_config: ProjectConfiguration | None, project_dir: str | os.PathLike[str] | None
) -> ProjectConfiguration:
    """The Accelerator's configuration from ``project_config`` and ``project_dir`` (either, or both
    when they name the same directory)."""
    if project_config is None:
        return ProjectConfiguration(project_dir=project_dir)
    if not isinstance(project_config, ProjectConfiguration):
        raise TypeError(f"project_config={project_config!r} must be an ember.ProjectConfiguration (or None)")
    if project_dir is not None:
        if project_config.project_dir is None:
            project_config.set_directories(project_dir)
        elif Path(project_config.project_dir).absolute() != Path(project_dir).absolute():
            raise ValueError(
                f"project_dir={os.fspath(project_dir)!r} and project_config.project_dir="
                f"{os.fspath(project_config.project_dir)!r} differ: give the project directory once"
            )
    return project_config
