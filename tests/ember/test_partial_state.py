"""``PartialState``: the processes of a run without an Accelerator, shared by every instance and with
the Accelerators of the process; tested on one process and on 2 real processes (gloo)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from dist_helpers import run_processes

from ember import Accelerator, DistributedType, PartialState


def test_one_process_and_the_state_is_shared() -> None:
    Accelerator().end_training()  # no Accelerator of an earlier test is current
    state = PartialState()
    assert (state.num_processes, state.process_index, state.local_process_index) == (1, 0, 0)
    assert state.is_main_process and state.is_local_main_process and state.is_last_process
    assert state.device == torch.device("cpu") and state.distributed_type == DistributedType.NO
    assert state.backend is None and not state.use_distributed
    assert PartialState()._strategy is state._strategy  # every instance: one state
    with state.split_between_processes([1, 2, 3]) as mine:
        assert mine == [1, 2, 3]
    accelerator = Accelerator()
    assert PartialState()._strategy is accelerator._strategy  # made after an Accelerator: its processes
    with pytest.raises(ValueError, match=r"PartialState\(cpu=False, backend='gloo'.*set up already"):
        PartialState(backend="gloo")
    accelerator.end_training()
    assert PartialState()._strategy is not accelerator._strategy  # ended: a new state


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"backend": "tcp"},
            ValueError,
            r"PartialState\(backend='tcp'\) is not valid. Valid choices: None, 'gloo'",
        ),
        ({"cpu": "yes"}, TypeError, r"PartialState\(cpu='yes'\) must be True or False"),
        ({"timeout": 30}, TypeError, r"PartialState\(timeout=30\) must be a datetime.timedelta"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        PartialState(**kwargs)


def _worker(root: str) -> dict:
    state = PartialState(timeout=timedelta(seconds=60))
    order = Path(root) / "order.txt"
    with state.main_process_first():
        if not state.is_main_process:
            time.sleep(0.5)  # were the main process not first, it would write after this one
        with open(order, "a") as f:
            f.write(f"{state.process_index}\n")
    with state.split_between_processes(list(range(5))) as mine:
        shares = state.gather_object([mine])
    state.wait_for_everyone()
    again = PartialState()
    # An Accelerator made now joins the same process group and trains on it.
    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(2, 1))
    accelerator.backward(model(torch.full((1, 2), float(state.process_index + 1))).sum())
    grads = accelerator.gather(model.module.weight.grad.reshape(1, -1)).tolist()
    return {
        "world": state.num_processes, "rank": state.process_index, "backend": state.backend,
        "type": str(state.distributed_type.value), "shares": shares, "same": again._strategy is state._strategy,
        "accelerator_world": accelerator.num_processes, "grads": grads, "order": order.read_text().split(),
    }  # fmt: skip


def test_two_processes(tmp_path: Path) -> None:
    results = run_processes(_worker, str(tmp_path), nprocs=2)
    for rank, result in enumerate(results):
        assert (result["world"], result["rank"], result["backend"]) == (2, rank, "gloo")
        assert result["type"] == "MULTI_CPU" and result["same"] and result["accelerator_world"] == 2
        assert result["shares"] == [[0, 1, 2], [3, 4]]
        assert result["grads"][0] == result["grads"][1] == [1.5, 1.5]  # DDP averaged over the group
    assert results[0]["order"][0] == "0"  # the main process went first
