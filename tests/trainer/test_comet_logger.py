"""CometLogger and log_with="comet_ml", offline: the experiments read back from Comet's archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from logger_fits import Crash, fit

from ember import Accelerator, CometLogger
from ember.callbacks import ModelCheckpoint

pytest.importorskip("comet_ml")  # (the dev extra installs it: the tests run)


def messages(directory: Path, key: str) -> list[dict[str, Any]]:
    """Every message of experiment ``key``'s offline archives in ``directory``, oldest archive first."""
    found = []
    for archive in sorted(directory.glob(f"{key}-*.zip"), key=lambda p: p.stat().st_mtime):
        with zipfile.ZipFile(archive) as z:
            found += [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line]
    return found


def metrics(found: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    return [
        (m["payload"]["metric"]["step"], m["payload"]["metric"]["metricValue"])
        for m in found
        if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"] == name
    ]


def parameters(found: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
        for m in found
        if m["type"] == "parameter_msg" and m["payload"]["param"]["source"] == "manual"
    }


def offline(directory: Path, **kwargs: Any) -> CometLogger:
    return CometLogger(project="reg", online=False, offline_directory=str(directory), display_summary_level=0,
                       log_code=False, log_git_metadata=False, log_git_patch=False, log_env_details=False,
                       auto_output_logging=False, **kwargs)  # fmt: skip


def test_fit_records_parameters_metrics_and_the_kept_checkpoint(tmp_path: Path) -> None:
    logger = offline(tmp_path / "comet", log_model=True, prefix="train")
    fit(tmp_path, logger, callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=1)])
    found = messages(tmp_path / "comet", logger.version)
    assert parameters(found) == {"lr": 0.1, "layer|width": 3, "layer|kind": "linear"}
    assert [step for step, _ in metrics(found, "train-loss_step")] == list(range(1, 9))
    assert [step for step, _ in metrics(found, "train-val_loss")] == [4, 8]
    uploads = [m["payload"] for m in found if m["type"] in ("file_upload", "remote_file")]
    assert {
        u["additional_params"]["groupingName"]
        for u in uploads
        if "groupingName" in u.get("additional_params", {})
    } == {"epoch=1-step=8"}


def test_a_resumed_fit_continues_the_checkpoints_experiment(tmp_path: Path) -> None:
    first = offline(tmp_path / "comet")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, first, callbacks=[ModelCheckpoint(save_last=True), Crash(at_step=6)])
    second = offline(tmp_path / "comet")
    assert second.version != first.version
    fit(
        tmp_path,
        second,
        callbacks=[ModelCheckpoint(save_last=True)],
        ckpt_path=tmp_path / "checkpoints" / "last",
    )
    assert second.version == first.version
    found = messages(tmp_path / "comet", first.version)
    assert len(list((tmp_path / "comet").glob(f"{first.version}-*.zip"))) == 2  # one archive per session
    # Step 6 crashed in on_train_batch_end, before its row was written: as in Lightning, the row
    # comes after that hook.
    assert sorted(step for step, _ in metrics(found, "loss_step")) == sorted([*range(1, 6), *range(5, 9)])


def test_accelerator_log_with_comet_ml(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="comet_ml", project_dir=tmp_path)
    accelerator.init_trackers(
        "proj", config={"lr": 0.1}, init_kwargs={"comet_ml": {"online": False, "display_summary_level": 0}}
    )
    accelerator.log({"loss": torch.tensor(1.5), "note": "hi"}, step=3)
    tracker = accelerator.get_tracker("comet_ml")
    assert isinstance(tracker, CometLogger) and tracker.name == "proj"
    accelerator.end_training()
    found = messages(tmp_path / "proj" / "comet", tracker.version)
    assert parameters(found) == {"lr": 0.1} and metrics(found, "loss") == [(3, 1.5)]
    texts = [
        m["payload"]
        for m in found
        if m["type"] == "file_upload" and m["payload"]["upload_type"] == "text-sample"
    ]
    assert [t["metadata"] for t in texts] == [{"name": "note"}]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"log_model": "best"},
            ValueError,
            r"CometLogger\(log_model='best'\): valid choices are False, True, 'all'",
        ),
        (
            {"mode": "new"},
            ValueError,
            r"CometLogger\(mode='new'\): valid choices are None, 'get_or_create', 'get', 'create'",
        ),
        ({"online": "no"}, TypeError, r"online='no'.*True or False or None"),
        (
            {"offline_dir": "x"},
            TypeError,
            r"unexpected keyword arguments \['offline_dir'\].*offline_directory",
        ),
    ],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        CometLogger(**kwargs)
    assert list(tmp_path.iterdir()) == []
