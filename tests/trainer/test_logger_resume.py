"""W&B, MLflow and Comet loggers continue the run a checkpoint names, unless the user said otherwise
(another project or experiment, another id given) — then a warning says which and why."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ember.trainer.loggers import CometLogger, MLFlowLogger, WandbLogger

# logger factory (place, given id), the state keys (id, place), the warning's name of the run
Make = Callable[[Path, str, "str | None"], Any]
LOGGERS: dict[str, tuple[Make, str, str, str]] = {
    "wandb": (lambda d, place, given: WandbLogger(project=place, save_dir=d, offline=True, id=given),
              "id", "project", "W&B run"),
    "mlflow": (lambda d, place, given: MLFlowLogger(experiment_name=place, save_dir=d, run_id=given),
               "run_id", "experiment_name", "MLflow run"),
    "comet": (lambda d, place, given: CometLogger(project=place, online=False, offline_directory=str(d),
                                                  experiment_key=given),
              "experiment_key", "project", "Comet experiment"),
}  # fmt: skip


def _state(kind: str, run: str, place: str) -> dict[str, Any]:
    _, id_key, place_key, _ = LOGGERS[kind]
    return {id_key: run, place_key: place, "logged_checkpoints": {"/ckpt/epoch=0": 1.5}}


@pytest.mark.parametrize("kind", sorted(LOGGERS))
def test_a_checkpoints_run_in_the_same_place_is_continued(tmp_path: Path, kind: str) -> None:
    make, id_key, _, _ = LOGGERS[kind]
    logger = make(tmp_path, "reg", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.load_state_dict(_state(kind, "a" * 32, "reg"))
    assert logger.state_dict()[id_key] == "a" * 32
    assert logger.state_dict()["logged_checkpoints"] == {"/ckpt/epoch=0": 1.5}


@pytest.mark.parametrize("kind", sorted(LOGGERS))
@pytest.mark.parametrize(
    ("place", "given", "reason"),
    [("other", None, r"is in \w+ 'other', this logger's in 'reg'"), ("reg", "b" * 32, "was given the")],
)
def test_another_place_or_a_given_id_wins_with_a_warning(
    tmp_path: Path, kind: str, place: str, given: str | None, reason: str
) -> None:
    make, id_key, _, run = LOGGERS[kind]
    logger = make(tmp_path, "reg", given)
    before = logger.state_dict()[id_key]
    with pytest.warns(UserWarning, match=rf"not continuing the checkpoint's {run} '{'a' * 32}': .*{reason}"):
        logger.load_state_dict(_state(kind, "a" * 32, place))
    assert logger.state_dict()[id_key] == before
    assert logger.state_dict()["logged_checkpoints"] == {}
