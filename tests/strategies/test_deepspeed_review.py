"""DeepSpeedStrategy: a plain one-process run, and the ``"auto"`` values of a DeepSpeed config that
ember fills (as 🤗 Accelerate does) or refuses by name."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_in_subprocess, run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator
from ember.strategies import DeepSpeedConfig, DeepSpeedStrategy

TIMEOUT = 600  # the first DeepSpeed start on a machine compiles its comm op


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model.config = SimpleNamespace(hidden_size=8)  # type: ignore[assignment]  # as a 🤗 Transformers model has
    return model


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))


def _one_process_worker() -> dict[str, Any]:
    # `python train.py`: no launcher, so no LOCAL_RANK, which DeepSpeed's engine insists on.
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": "auto"}  # fmt: skip
    accelerator = Accelerator(strategy=DeepSpeedStrategy(DeepSpeedConfig(config={"zero_optimization": zero})))
    model = _model()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_data(), batch_size=4)
    )
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
    weights = accelerator.get_state_dict(model)
    plain = _model()  # the same steps in a plain loop
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in DataLoader(_data(), batch_size=4):
        F.mse_loss(plain(x), y).backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()
    result = {
        "zero": accelerator.strategy.deepspeed_config["zero_optimization"],  # type: ignore[attr-defined]
        "error": max(float((weights[k] - v).abs().max()) for k, v in plain.state_dict().items()),
    }
    # find_executable_batch_size's retry: free everything, prepare anew at a smaller batch size.
    model, optimizer, loader = accelerator.free_memory(model, optimizer, loader)
    model = _model()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_data(), batch_size=2)
    )
    x, y = next(iter(loader))
    accelerator.backward(F.mse_loss(model(x), y))
    optimizer.step()
    result["micro_batch_again"] = accelerator.strategy.micro_batch_size  # type: ignore[attr-defined]
    return result


@pytest.mark.timeout(TIMEOUT + 60)
def test_one_process_run_and_hidden_size_autos_as_in_accelerate() -> None:
    result = run_in_subprocess(_one_process_worker, timeout=TIMEOUT)
    assert result["error"] < 1e-6
    zero = result["zero"]  # filled from model.config.hidden_size (8), as Accelerate does
    assert zero["reduce_bucket_size"] == 64 and zero["stage3_prefetch_bucket_size"] == 57
    assert zero["stage3_param_persistence_threshold"] == 80
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert result["micro_batch_again"] == 2  # free_memory released the engine: a new one was built


def test_auto_values_ember_cannot_fill_are_refused_by_name() -> None:
    config = {
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
        "optimizer": {"type": "Adam", "params": {"lr": "auto", "torch_adam": True}},
    }
    accelerator = Accelerator(strategy=DeepSpeedStrategy(DeepSpeedConfig(config=config)))
    model = nn.Linear(4, 1)  # no model.config.hidden_size: nothing to size the buckets by
    with pytest.raises(
        ValueError,
        match=r"the DeepSpeed config leaves zero_optimization\.reduce_bucket_size, optimizer\.params\.lr at 'auto'",
    ):
        accelerator.prepare(model, DataLoader(_data(), batch_size=4))


class _Shifted(nn.Module):
    """A linear layer plus a buffer: ZeRO-3 partitions the parameters, not the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.register_buffer("shift", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.shift


def _loaded(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = _Shifted().state_dict()
    state["shift"] = torch.tensor([0.5])
    return state


def _load_then_train_worker(strategies: list[str]) -> list[dict[str, Any]]:
    return [_load_then_train(strategy) for strategy in strategies]  # one process group, an engine each


def _load_then_train(strategy: str) -> dict[str, Any]:
    accelerator = Accelerator(strategy=strategy)
    torch.manual_seed(0)
    model = _Shifted()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_data(), batch_size=4)
    )
    accelerator.strategy.load_module_state_dict(model, _loaded(7))  # e.g. validate(ckpt_path=...)
    after_load = {k: v.flatten().tolist() for k, v in accelerator.strategy.module_state_dict(model).items()}
    x, y = next(iter(loader))
    accelerator.backward(F.mse_loss(model(x), y))  # the step starts from the loaded weights
    optimizer.step()
    trained = {k: v.flatten().tolist() for k, v in accelerator.strategy.module_state_dict(model).items()}
    return {"after_load": after_load, "trained": trained}


@pytest.mark.timeout(TIMEOUT + 60)
def test_loaded_weights_reach_every_rank_and_the_master_copy() -> None:
    stages = ["deepspeed_stage_2", "deepspeed_stage_3"]
    ranks = [
        r
        for results in run_processes(_load_then_train_worker, stages, nprocs=2, timeout=TIMEOUT)
        for r in results
    ]
    plain = _Shifted()
    plain.load_state_dict(_loaded(7))
    expected = {k: v.flatten().tolist() for k, v in plain.state_dict().items()}
    x, y = _data().tensors  # rank r takes samples r, r + 2, ...: both ranks' first batches are the first 8
    F.mse_loss(plain(x[:8]), y[:8]).backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    assert [rank["after_load"] for rank in ranks] == [expected] * 4  # the buffer too, on rank 1
    for rank in ranks:
        for name, values in plain.state_dict().items():
            torch.testing.assert_close(
                torch.tensor(rank["trained"][name]), values.flatten(), rtol=1e-5, atol=1e-6
            )
