"""notebook_launcher (🤗 Accelerate's): a function, not a script, run on 2 forked processes that
form a real gloo group; one process runs in place; bad arguments are refused before any fork."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port

from ember import Accelerator, notebook_launcher


def _train(out: str, scale: float) -> None:
    # Defined in the test module and never pickled: the processes are forked.
    accelerator = Accelerator()
    total = accelerator.reduce(torch.tensor([float(accelerator.process_index + 1) * scale]), "sum")
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes,
              "total": total.item(), "precision": accelerator.precision.name}  # fmt: skip
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.end_training()


def _fail(out: str) -> None:
    accelerator = Accelerator()
    if accelerator.process_index == 1:
        raise ValueError("rank 1 could not go on")
    accelerator.end_training()


def test_two_processes_form_a_group(tmp_path: Path) -> None:
    notebook_launcher(_train, args=(str(tmp_path), 10.0), num_processes=2, mixed_precision="bf16",
                      use_port=str(free_port()))  # fmt: skip
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world"] == 2 for r in records)
    assert all(r["total"] == 30.0 and r["precision"] == "bf16-mixed" for r in records)
    assert "RANK" not in os.environ  # the variables were the children's only


def test_a_failing_process_fails_the_launch(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="rank 1 could not go on"):
        notebook_launcher(_fail, args=(str(tmp_path),), num_processes=2, use_port=free_port())


def test_one_process_runs_here_with_the_precision_default(tmp_path: Path) -> None:
    notebook_launcher(_train, args=(str(tmp_path), 1.0), num_processes=1, mixed_precision="bf16")
    assert json.loads((tmp_path / "rank0.json").read_text()) == {
        "rank": 0, "world": 1, "total": 1.0, "precision": "bf16-mixed"
    }  # fmt: skip
    assert "EMBER_PRECISION" not in os.environ


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_processes": 0}, ValueError, r"num_processes=0\) must be an int >= 1"),
        ({"mixed_precision": "fp8"}, ValueError, r"mixed_precision='fp8'.*'no', 'fp16', 'bf16'"),
        ({"use_port": "http"}, ValueError, r"use_port='http'\) must be a port number"),
        ({"num_nodes": 2, "node_rank": 2}, ValueError, r"node_rank=2\) must be an int in \[0, 1\]"),
        ({"args": "abc"}, TypeError, "must be a tuple or list"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], message: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        notebook_launcher(_train, **{"args": (str(tmp_path), 1.0), **kwargs})
    assert not list(tmp_path.iterdir())
