"""accelerator.profile() and ProfileKwargs (🤗 Accelerate's profiler context); on two processes in
tests/ember/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Accelerator, ProfileKwargs


def _work() -> None:
    a = torch.randn(32, 32)
    for _ in range(3):
        a = torch.mm(a, a).tanh()


def test_profile_with_defaults_records_the_block() -> None:
    accelerator = Accelerator(cpu=True)
    with accelerator.profile() as prof:
        _work()
    names = {event.key for event in prof.key_averages()}
    assert "aten::mm" in names and "aten::tanh" in names


def test_the_accelerators_handler_schedule_and_trace(tmp_path: Path) -> None:
    ready: list[int] = []
    handler = ProfileKwargs(
        activities=["cpu"],
        schedule_option={"wait": 1, "warmup": 1, "active": 2},
        on_trace_ready=lambda prof: ready.append(prof.step_num),
        record_shapes=True,
        output_trace_dir=str(tmp_path / "traces"),
    )
    accelerator = Accelerator(cpu=True, kwargs_handlers=[handler])
    assert accelerator.profile_handler is handler
    with accelerator.profile() as prof:
        for _ in range(5):
            _work()
            prof.step()
    assert ready == [4]  # one active cycle: steps 2 and 3 recorded, ready at the end of it
    # The cycle's trace, written when it ended (the profiler clears its events then).
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["profile_0_step4.json"]
    trace = json.loads((tmp_path / "traces" / "profile_0_step4.json").read_text())
    mms = [event for event in trace["traceEvents"] if event.get("name") == "aten::mm"]
    assert len(mms) == 6  # 3 per recorded step
    assert mms[0]["args"]["Input Dims"] == [[32, 32], [32, 32]]  # record_shapes


def test_a_handler_passed_to_profile_wins(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ProfileKwargs(output_trace_dir=str(tmp_path / "a"))])
    with accelerator.profile(ProfileKwargs(output_trace_dir=str(tmp_path / "b"))):
        _work()
    assert (tmp_path / "b" / "profile_0.json").is_file() and not (tmp_path / "a").exists()


def test_bad_profile_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"activities=\[\.\.\., 'gpu', \.\.\.\]\): valid choices are 'cpu', 'cuda'"
    ):
        ProfileKwargs(activities=["cpu", "gpu"])
    accelerator = Accelerator(cpu=True)
    wrong: Any = {"output_trace_dir": "x"}
    with pytest.raises(TypeError, match="takes an ember.ProfileKwargs, not dict"):
        with accelerator.profile(wrong):
            pass
    blocked = tmp_path / "file"
    blocked.write_text("")
    ran = []
    with pytest.raises(FileExistsError):  # the trace directory is made before the block runs
        with accelerator.profile(ProfileKwargs(output_trace_dir=str(blocked))):
            ran.append(True)
    assert not ran
    with pytest.raises(ValueError, match="one ProfileKwargs at most"):
        Accelerator(cpu=True, kwargs_handlers=[ProfileKwargs(), ProfileKwargs()])
