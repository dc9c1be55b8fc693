"""ember.utilities: Lightning's ``lightning.pytorch.utilities`` helpers, with the values Lightning 2.6.6
gives (recorded below, the probes run in the venv's Lightning on CPU)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ember import Accelerator, state
from ember.utilities import (
    AttributeDict,
    CombinedLoader,
    EmberDeprecationWarning,
    find_shared_parameters,
    grad_norm,
    is_picklable,
    measure_flops,
    move_data_to_device,
    rank_zero_debug,
    rank_zero_deprecation,
    rank_zero_info,
    rank_zero_only,
    rank_zero_warn,
    set_shared_parameters,
    suggested_max_num_workers,
)


def _model_with_gradients() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    return model


# recorded with Lightning 2.6.6: grad_norm(_model_with_gradients(), p), rounded to 6 places
LIGHTNING_GRAD_NORMS = {
    2: {"grad_2.0_norm/0.weight": 0.468438, "grad_2.0_norm/0.bias": 0.282217,
        "grad_2.0_norm/2.weight": 0.223412, "grad_2.0_norm_total": 0.590756},
    1: {"grad_1.0_norm/0.weight": 1.165941, "grad_1.0_norm/0.bias": 0.476383,
        "grad_1.0_norm/2.weight": 0.54822, "grad_1.0_norm_total": 2.190544},
    "inf": {"grad_inf_norm/0.weight": 0.337422, "grad_inf_norm/0.bias": 0.223591,
            "grad_inf_norm/2.weight": 0.157031, "grad_inf_norm_total": 0.337422},
    2.5: {"grad_2.5_norm/0.weight": 0.410108, "grad_2.5_norm/0.bias": 0.259298,
          "grad_2.5_norm/2.weight": 0.193136, "grad_2.5_norm_total": 0.478446},
}  # fmt: skip


@pytest.mark.parametrize("norm_type", list(LIGHTNING_GRAD_NORMS))
def test_grad_norm_has_lightnings_keys_and_values(norm_type: float | str) -> None:
    model = _model_with_gradients()
    norms = grad_norm(model, norm_type)
    assert list(norms) == list(LIGHTNING_GRAD_NORMS[norm_type])
    assert {k: round(float(v), 6) for k, v in norms.items()} == LIGHTNING_GRAD_NORMS[norm_type]
    # the total is the norm of every gradient as one vector (a plain PyTorch computation)
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    total = norms[next(k for k in norms if k.endswith("_total"))]
    assert torch.allclose(total, torch.linalg.vector_norm(flat, float(norm_type)))


def test_grad_norm_separator_missing_gradients_and_bad_norm_type() -> None:
    model = _model_with_gradients()
    assert "grad_2.0_norm.0.weight" in grad_norm(model, 2, group_separator=".")
    assert grad_norm(nn.Linear(2, 2), 2) == {}  # no gradient yet: nothing, as Lightning
    for bad in (0, -1, "two", None, float("nan"), True):
        with pytest.raises(ValueError, match=r"grad_norm\(norm_type=.*positive number or 'inf'"):
            grad_norm(model, bad)  # type: ignore[arg-type]


def test_rank_zero_only_runs_on_rank_zero_and_returns_default_elsewhere(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @rank_zero_only
    def record(value: int) -> int:
        calls.append(value)
        return value

    assert rank_zero_only.rank == 0 and record(1) == 1  # a plain process is rank 0
    try:
        rank_zero_only.rank = 1  # Lightning's way of telling it (its strategies do so)
        assert record(2) is None and rank_zero_only(record, default=7)(3) == 7
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, "ember"):
            warnings.simplefilter("always")
            rank_zero_warn("no")
            rank_zero_deprecation("no")
            rank_zero_info("no")
            rank_zero_debug("no")
        assert caught == [] and caplog.records == []
    finally:
        rank_zero_only.rank = None  # follows the run again
    assert calls == [1]
    # The launcher's rank (torchrun, ember launch, SLURM) when no Accelerator of this process knows it.
    monkeypatch.setattr(state, "_current", None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_zero_only.rank == 1 and record(4) is None
    monkeypatch.setenv("RANK", "0")
    assert record(5) == 5 and calls == [1, 5]
    with pytest.raises(ValueError, match=r"rank_zero_only\(rank=-1\) must be an int >= 0"):
        rank_zero_only.rank = -1


def test_rank_zero_deprecation_is_shown_by_default_as_lightnings_is(tmp_path: Path) -> None:
    # Python hides a DeprecationWarning raised outside __main__; Lightning shows its own
    # (LightningDeprecationWarning, a subclass it filters to "default"): ember's category is shown too.
    (tmp_path / "library.py").write_text(
        "from ember.utilities import rank_zero_deprecation\n"
        "def old():\n"
        "    rank_zero_deprecation('`old_arg` is deprecated')\n"
    )
    done = subprocess.run([sys.executable, "-c", "import library; library.old()"], cwd=tmp_path,
                          capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert "library.py:3: EmberDeprecationWarning: `old_arg` is deprecated" in done.stderr
    assert issubclass(EmberDeprecationWarning, DeprecationWarning)


def test_rank_zero_only_follows_the_accelerator_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator = Accelerator(cpu=True)  # rank 0 of 1
    monkeypatch.setenv("RANK", "1")  # (variables that would say otherwise: the Accelerator knows better)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_zero_only.rank == accelerator.process_index == 0


def test_rank_zero_messages_name_the_callers_line(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match="careful") as caught:
        rank_zero_warn("careful")
    with pytest.warns(DeprecationWarning, match="old") as old:
        rank_zero_deprecation("old")
    assert caught[0].filename == old[0].filename == __file__
    with caplog.at_level(logging.DEBUG, "ember"):
        rank_zero_info("hello %s", "there")
        rank_zero_debug("details")
    assert [(r.levelname, r.getMessage(), r.pathname) for r in caplog.records] == [
        ("INFO", "hello there", __file__),
        ("DEBUG", "details", __file__),
    ]


def test_measure_flops_matches_lightning() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(2, 32)
    # recorded with Lightning 2.6.6: 2304 (forward) and 4864 (forward, loss and backward)
    assert measure_flops(model, lambda: model(x)) == 2304
    assert measure_flops(model, lambda: model(x), lambda y: y.sum()) == 4864
    with pytest.raises(TypeError, match=r"measure_flops\(loss_fn=3\)"):
        measure_flops(model, lambda: model(x), 3)  # type: ignore[arg-type]


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    n: int = 3


def test_move_data_to_device_moves_nested_tensors() -> None:
    batch = {"a": [torch.ones(1), (torch.zeros(2),)], "b": _Batch(torch.ones(3)), "s": "text"}
    moved = move_data_to_device(batch, "meta")
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and moved["b"].x.is_meta
    assert moved["s"] == "text" and moved["b"].n == 3 and isinstance(moved["a"][1], tuple)
    assert move_data_to_device(torch.ones(1), torch.device("meta")).is_meta
    with pytest.raises(TypeError, match=r"move_data_to_device\(device=1.5\)"):
        move_data_to_device(batch, 1.5)  # type: ignore[arg-type]


def test_is_picklable() -> None:
    assert is_picklable({"lr": 0.1}) and is_picklable(torch.ones(1))
    assert not is_picklable(lambda: 0) and not is_picklable(threading.Lock())


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.c = nn.Sequential(nn.Linear(2, 2))
        self.b.weight = self.a.weight
        self.c[0].bias = self.a.bias


def test_find_and_set_shared_parameters() -> None:
    # recorded with Lightning 2.6.6
    assert find_shared_parameters(_Tied()) == [["a.weight", "b.weight"], ["a.bias", "c.0.bias"]]
    untied = _Tied()
    untied.b.weight = nn.Parameter(torch.zeros(2, 2))
    assert find_shared_parameters(untied) == [["a.bias", "c.0.bias"]]
    assert set_shared_parameters(untied, [["a.weight", "b.weight"]]) is untied
    assert untied.b.weight is untied.a.weight
    assert find_shared_parameters(untied) == [["a.weight", "b.weight"], ["a.bias", "c.0.bias"]]


def test_suggested_max_num_workers() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert suggested_max_num_workers(1) == max(1, cpus - 1)
    assert suggested_max_num_workers(10_000) == 1
    with pytest.raises(
        ValueError, match=r"suggested_max_num_workers\(local_world_size=0\) must be an int >= 1"
    ):
        suggested_max_num_workers(0)


def test_reexports() -> None:
    from ember.trainer.combined import CombinedLoader as Combined
    from ember.trainer.hparams import AttributeDict as Attributes

    assert CombinedLoader is Combined and AttributeDict is Attributes
    assert AttributeDict(lr=0.1).lr == 0.1
