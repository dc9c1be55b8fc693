"""``clip_gradients`` and ``gradient_clip_algorithm`` as Lightning 2.6.6 checks them: the algorithm in
any case, and a value or algorithm that contradicts the Trainer's own setting is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ember import Trainer, TrainModule
from tests.small_fit import quiet_trainer, regression_loader


class _Clipping(TrainModule):
    """Its ``configure_gradient_clipping`` calls ``clip_gradients`` with the given arguments."""

    def __init__(self, *clip_args: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.clip_args = clip_args

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return F.mse_loss(self.layer(batch[0]), batch[1]) * 100  # large gradients: clipping shows

    def configure_gradient_clipping(self, optimizer: Any, *args: Any) -> None:
        self.clip_gradients(optimizer, *self.clip_args)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, module: TrainModule, **kwargs: Any) -> Trainer:
    trainer = quiet_trainer(tmp_path, [], max_steps=2, **kwargs)
    trainer.fit(module, regression_loader())
    return trainer


def test_the_algorithm_is_accepted_in_any_case(tmp_path: Path) -> None:
    assert Trainer(gradient_clip_algorithm="VALUE").gradient_clip_algorithm == "value"
    assert Trainer(gradient_clip_algorithm="Norm").gradient_clip_algorithm == "norm"
    by_value = _Clipping(0.01, "Value")  # clip_gradients lower-cases its argument too
    _fit(tmp_path / "a", by_value, gradient_clip_algorithm="VALUE")
    reference = _Clipping(0.01, "value")
    _fit(tmp_path / "b", reference)
    assert torch.equal(by_value.layer.weight, reference.layer.weight)
    by_norm = _Clipping(0.01, "NORM")
    _fit(tmp_path / "c", by_norm)
    assert not torch.equal(by_norm.layer.weight, reference.layer.weight)
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='max'.*'norm', 'value'"):
        Trainer(gradient_clip_algorithm="max")


def test_clip_gradients_may_not_contradict_the_trainers_settings(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"Trainer\(gradient_clip_val=0\.01\).*clip_gradients\(gradient_clip_val=0\.5\)"
    ):
        _fit(tmp_path / "a", _Clipping(0.5), gradient_clip_val=0.01)
    with pytest.raises(
        ValueError,
        match=r"Trainer\(gradient_clip_algorithm='value'\).*clip_gradients\(gradient_clip_algorithm='norm'\)",
    ):
        _fit(tmp_path / "b", _Clipping(0.01, "norm"), gradient_clip_algorithm="value")
    # The same settings, or the Trainer's left unset, are no contradiction.
    _fit(tmp_path / "c", _Clipping(0.01, "Value"), gradient_clip_val=0.01, gradient_clip_algorithm="value")
    _fit(tmp_path / "d", _Clipping(0.5, "value"))
