"""ModelSummary's input and output sizes, from a forward pass with the module's example_input_array
(Lightning's "In sizes" / "Out sizes" columns)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import ModelSummary
from ember.callbacks.model_summary import summarize


class Model(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512))
        self.unused = nn.Linear(2, 2)  # never called by forward: "?"
        self.example_input_array = torch.zeros(10, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch[0])[:, :1], batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _sizes(module: nn.Module, max_depth: int = 1) -> dict[str, tuple[str | None, str | None]]:
    return {row.name: (row.in_size, row.out_size) for row in summarize(module, max_depth)}


def test_the_rows_hold_each_layers_input_and_output_sizes() -> None:
    model = Model()
    assert _sizes(model, -1) == {
        "net": ("[10, 256]", "[10, 512]"),
        "net.0": ("[10, 256]", "[10, 512]"),
        "net.1": ("[10, 512]", "[10, 512]"),
        "unused": ("?", "?"),
    }
    assert summarize(model, 0) == []
    model.example_input_array = None
    assert _sizes(model) == {"net": (None, None), "unused": (None, None)}  # no column without an example


def test_the_forward_runs_in_eval_mode_without_gradients_and_restores_every_mode() -> None:
    model = Model()
    model.unused.eval()
    norm = model.net[1]
    seen: list[tuple[bool, bool]] = []
    norm.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    running_mean = norm.running_mean.clone()
    rows = summarize(model, -1)
    assert seen == [(False, False)]
    assert torch.equal(norm.running_mean, running_mean)  # eval: the statistics did not move
    assert model.training and model.net.training and norm.training and not model.unused.training
    assert {r.name: r.mode for r in rows}["unused"] == "eval"


class Pair(TrainModule):
    """Two inputs, positional or keyword; a layer called twice keeps its first call's sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(3, 2), nn.Linear(4, 2)
        self.twice = nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.twice(self.left(x)), self.right(y)
        return self.twice(a.unsqueeze(0)), b


@pytest.mark.parametrize("keywords", [False, True])
def test_tuple_and_dict_examples_are_the_forwards_arguments(keywords: bool) -> None:
    model = Pair()
    x, y = torch.zeros(5, 3), torch.zeros(5, 4)
    model.example_input_array = {"x": x, "y": y} if keywords else (x, y)
    assert _sizes(model) == {
        "left": ("[5, 3]", "[5, 2]"),
        "right": ("[5, 4]", "[5, 2]"),
        "twice": ("[5, 2]", "[5, 2]"),
    }


def test_the_printed_table_has_the_size_columns(capsys: pytest.CaptureFixture[str]) -> None:
    trainer = SimpleNamespace(is_global_zero=True)
    ModelSummary(max_depth=2).on_fit_start(trainer, Model())  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Name", "Type", "Params", "Trainable", "Mode", "In", "sizes", "Out", "sizes"]
    rows = {line.split()[1]: line for line in lines[1:5]}
    assert rows["net"].split()[:3] == ["0", "net", "Sequential"]
    assert rows["net"].endswith("train  [10, 256]  [10, 512]")
    assert rows["net.0"].endswith("train  [10, 256]  [10, 512]")
    assert rows["net.1"].endswith("train  [10, 512]  [10, 512]")
    assert rows["unused"].split()[-3:] == ["train", "?", "?"]


def test_other_ranks_run_the_forward_too_and_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # Under FSDP or DeepSpeed the forward gathers parameters, a collective every process must join.
    model = Model()
    calls: list[int] = []
    model.net.register_forward_hook(lambda m, i, o: calls.append(1))
    ModelSummary().on_fit_start(SimpleNamespace(is_global_zero=False), model)  # type: ignore[arg-type]
    assert calls == [1] and capsys.readouterr().out == ""
    ModelSummary(max_depth=0).on_fit_start(SimpleNamespace(is_global_zero=False), model)  # type: ignore[arg-type]
    assert calls == [1]


def test_a_fit_prints_the_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = TensorDataset(torch.randn(8, 256), torch.randn(8, 1))
    trainer = Trainer(default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False)  # fmt: skip
    trainer.fit(Model(), DataLoader(data, batch_size=4))
    out = capsys.readouterr().out
    assert "In sizes" in out and "Out sizes" in out and "[10, 256]" in out
