"""ProjectConfiguration (🤗 Accelerate's): automatic checkpoint naming, total_limit, the iteration a
resumed run continues from, logging_dir for trackers, save_on_each_node; and
step_scheduler_with_optimizer."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from dist_helpers import run_processes
from torch import nn
from workers import project_worker

from ember import Accelerator, ProjectConfiguration


def _prepared(accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 2)
    return accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))


def _names(root: Path) -> list[str]:
    return sorted(os.listdir(root / "checkpoints"))


def test_automatic_naming_keeps_the_newest_and_a_resumed_run_numbers_on(tmp_path: Path) -> None:
    config = ProjectConfiguration(project_dir=tmp_path, automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(project_config=config)
    assert accelerator.project_dir == tmp_path and accelerator.logging_dir == tmp_path
    model, _ = _prepared(accelerator)
    weights = {}
    for i in range(4):
        with torch.no_grad():
            model.weight.fill_(float(i))
        assert accelerator.save_state() == tmp_path.absolute() / "checkpoints" / f"checkpoint_{i}"
        weights[i] = model.weight.clone()
        assert _names(tmp_path) == [f"checkpoint_{n}" for n in range(max(0, i - 1), i + 1)]
    assert accelerator.save_iteration == 4

    # A new run (a new process would start at iteration 0): load_state() takes the newest, and the
    # next save goes after it instead of failing on an existing name.
    again = Accelerator(
        project_config=ProjectConfiguration(project_dir=tmp_path, automatic_checkpoint_naming=True)
    )
    model2, _ = _prepared(again)
    again.load_state()
    assert torch.equal(model2.weight, weights[3]) and again.save_iteration == 4
    assert again.save_state().name == "checkpoint_4"

    # An explicit directory is honoured and not counted.
    assert accelerator.save_state(tmp_path / "mine") == (tmp_path / "mine").absolute()
    assert accelerator.save_iteration == 4


def test_an_existing_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    accelerator = Accelerator(
        project_config=ProjectConfiguration(project_dir=tmp_path, automatic_checkpoint_naming=True)
    )
    _prepared(accelerator)
    accelerator.save_state()
    accelerator.project_configuration.iteration = 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"checkpoint_0 exists already .*iteration=0"):
        accelerator.save_state()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_without_automatic_naming_a_directory_is_required(tmp_path: Path) -> None:
    accelerator = Accelerator(project_dir=tmp_path)
    _prepared(accelerator)
    with pytest.raises(ValueError, match="save_state\\(\\) needs output_dir"):
        accelerator.save_state()
    with pytest.raises(ValueError, match="load_state\\(\\) needs input_dir"):
        accelerator.load_state()
    nowhere = Accelerator(project_config=ProjectConfiguration(automatic_checkpoint_naming=True))
    with pytest.raises(ValueError, match="needs a project directory"):
        nowhere.save_state()
    empty = Accelerator(
        project_config=ProjectConfiguration(project_dir=tmp_path, automatic_checkpoint_naming=True)
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint_<N> directory"):
        empty.load_state()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ProjectConfiguration\(total_limit=0\) .*>= 1"):
        ProjectConfiguration(total_limit=0)
    with pytest.raises(ValueError, match=r"ProjectConfiguration\(iteration=-1\) .*>= 0"):
        ProjectConfiguration(iteration=-1)
    with pytest.raises(TypeError, match="automatic_checkpoint_naming"):
        ProjectConfiguration(automatic_checkpoint_naming="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ: give the project directory once"):
        Accelerator(project_dir="a", project_config=ProjectConfiguration(project_dir="b"))
    with pytest.raises(TypeError, match="must be an ember.ProjectConfiguration"):
        Accelerator(project_config={"project_dir": "a"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="step_scheduler_with_optimizer"):
        Accelerator(step_scheduler_with_optimizer=1)  # type: ignore[arg-type]


def test_project_dir_fills_an_empty_configuration_and_trackers_use_logging_dir(tmp_path: Path) -> None:
    config = ProjectConfiguration(logging_dir=tmp_path / "logs")
    accelerator = Accelerator(project_dir=tmp_path / "run", project_config=config, log_with="csv")
    assert accelerator.project_dir == tmp_path / "run" and accelerator.logging_dir == tmp_path / "logs"
    accelerator.init_trackers("exp", config=argparse.Namespace(lr=0.1, inner=argparse.Namespace(width=3)))
    accelerator.log({"loss": 1.0}, step=0)
    accelerator.end_training()
    assert list((tmp_path / "logs" / "exp").rglob("*.csv")) and not (tmp_path / "run").exists()
    (hparams,) = (tmp_path / "logs" / "exp").rglob("hparams.json")  # a Namespace config, as a dict
    assert json.loads(hparams.read_text()) == {"inner": {"width": 3}, "lr": 0.1}


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
@pytest.mark.parametrize("with_optimizer", [True, False])
def test_step_scheduler_with_optimizer(with_optimizer: bool) -> None:
    accelerator = Accelerator(gradient_accumulation_steps=2, step_scheduler_with_optimizer=with_optimizer)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(4):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(2, 4)).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    # With the optimizer: 2 real steps of 4 micro-steps; without: every call.
    assert scheduler.last_epoch == (2 if with_optimizer else 4)


def test_on_two_nodes(tmp_path: Path) -> None:
    # One process per node: automatic naming agrees on every rank (only rank 0 deletes, after the
    # save), save() with save_on_each_node writes on each node, save_state refuses it.
    ranks = run_processes(project_worker, str(tmp_path), nprocs=2, nodes=2)
    for result in ranks:
        assert result["saved"] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
        assert result["listed"] == ["checkpoint_1", "checkpoint_2"]
        assert result["restored"] and result["iteration"] == 3
        assert "save_on_each_node=True) on several nodes" in result["refused"]
    assert torch.load(tmp_path / "node0.pt")["node"] == 0 and torch.load(tmp_path / "node1.pt")["node"] == 1
    assert _names(tmp_path) == ["checkpoint_1", "checkpoint_2"]
