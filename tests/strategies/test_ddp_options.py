"""DDPStrategy's options next to Lightning's DDPStrategy and 🤗 Accelerate's DistributedDataParallelKwargs:
communication hooks, the registered names, the unused-parameters error (2 gloo processes on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_helpers import run_processes
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook

from ember import Accelerator, DistributedDataParallelKwargs
from ember.kwargs_handlers import ddp_strategy
from ember.strategies import DDPConfig, DDPStrategy
from ember.strategies.base import resolve_strategy


class _PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _comm_hooks_worker() -> dict:
    # Accelerate's spelling: an fp16-compressed all-reduce. Its result is a mean taken in fp16, so
    # every value is an fp16 number, which the exact fp32 mean of the ranks' gradients is not.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(comm_hook="fp16")])
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    plain = copy.deepcopy(model)
    prepared = accelerator.prepare(model)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(accelerator.process_index)) / 3
    prepared(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    grad, exact = model.weight.grad, accelerator.reduce(plain.weight.grad.clone(), "mean")
    fp16 = {
        "hook": prepared._get_ddp_logging_data().get("comm_hook"),
        "fp16_values": torch.equal(grad, grad.half().float()),
        "exact_is_fp16": torch.equal(exact, exact.half().float()),
        "close": torch.allclose(grad, exact, rtol=1e-3, atol=1e-4),
    }
    # Torch refuses the bf16 hook without CUDA + NCCL: its error names the DDPConfig option too.
    bf16 = Accelerator(cpu=True, strategy=DDPStrategy(DDPConfig(comm_hook="bf16")))
    try:
        bf16.prepare(nn.Linear(2, 2))
        refused = ""
    except TypeError as error:
        refused = str(error) + " ".join(getattr(error, "__notes__", []))
    # PowerSGD by name, options as a dict: each model gets its own state; the replicas stay equal.
    power = Accelerator(
        cpu=True,
        strategy=DDPStrategy(
            DDPConfig(
                comm_hook="power_sgd", comm_state={"matrix_approximation_rank": 1, "start_powerSGD_iter": 2}
            )
        ),
    )
    first, second = power.prepare(nn.Linear(8, 8), nn.Linear(8, 8))
    optimizer = power.prepare(torch.optim.SGD(first.parameters(), lr=0.1))
    for step in range(4):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(10 * step + power.process_index))
        power.backward(first(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    states = [m._comm_hooks[0][1] for m in (first, second)]
    weights = power.gather(power.unwrap_model(first).weight.detach()[None])
    # The default DDP (find_unused_parameters=False): the second forward fails; the error says how to fix it.
    partly = accelerator.prepare(_PartlyUsed())
    message = ""
    try:
        for _ in range(2):
            partly(torch.ones(1, 2)).sum().backward()
    except RuntimeError as error:
        message = str(error) + "\n".join(getattr(error, "__notes__", []))
    accelerator.end_training()
    return {
        **fp16,
        "bf16_refused": refused,
        "power_hook": first._get_ddp_logging_data().get("comm_hook"),
        "own_states": states[0] is not states[1],
        "rank": [s.matrix_approximation_rank for s in states],
        "equal_replicas": torch.equal(weights[0], weights[1]),
        "unused_message": message,
    }


def test_comm_hooks_are_applied_and_unused_parameters_are_explained() -> None:
    for rank in run_processes(_comm_hooks_worker, nprocs=2):
        assert rank["hook"] == "fp16_compress_hook"
        assert rank["fp16_values"] and not rank["exact_is_fp16"] and rank["close"]
        assert "BF16" in rank["bf16_refused"] and "DDPConfig(comm_hook='bf16'" in rank["bf16_refused"]
        assert rank["power_hook"] == "powerSGD_hook" and rank["own_states"] and rank["rank"] == [1, 1]
        assert rank["equal_replicas"]
        message = rank["unused_message"]
        assert "DDPConfig(find_unused_parameters=True)" in message
        assert "'ddp_find_unused_parameters_true'" in message and "(unused.weight, unused.bias)" in message


def test_lightning_ddp_names() -> None:
    found = resolve_strategy("ddp_find_unused_parameters_false", world_size=2)
    assert isinstance(found, DDPStrategy) and found.config.find_unused_parameters is False
    assert resolve_strategy("ddp_find_unused_parameters_true", world_size=2).config.find_unused_parameters
    # Lightning's spawn / fork / notebook variants start the ranks at fit(); ember says what to use.
    for name in ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"):
        with pytest.raises(
            ValueError, match=rf"strategy='{name}' .*notebook_launcher.* Valid choices: 'auto', 'ddp'"
        ):
            resolve_strategy(name, world_size=2)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            {"comm_hook": "fp32"},
            r"comm_hook='fp32'\) is not valid\. Valid choices: None, 'fp16', 'bf16', 'power_sgd'",
        ),
        (
            {"comm_hook": "fp16", "comm_wrapper": "int8"},
            r"comm_wrapper='int8'\) is not valid\. Valid choices: None, 'fp16'",
        ),
        ({"comm_wrapper": "fp16"}, r"comm_wrapper='fp16'\) needs a comm_hook"),
        ({"comm_state": object()}, r"comm_state=.* needs a comm_hook"),
        (
            {"comm_hook": "fp16", "comm_state": {"matrix_approximation_rank": 2}},
            r"goes with comm_hook='power_sgd'",
        ),
        ({"comm_hook": post_localSGD_hook.post_localSGD_hook}, r"post-localSGD .* model_averaging_period"),
    ],
)
def test_comm_option_errors(options: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        DDPConfig(**options)


def test_accelerate_comm_options_build_the_ddp_config() -> None:
    handler = DistributedDataParallelKwargs(
        comm_hook="power_sgd", comm_wrapper="fp16", comm_state_option={"matrix_approximation_rank": 2}
    )
    strategy = ddp_strategy({DistributedDataParallelKwargs: handler}, "ddp", 2, "cpu")
    assert isinstance(strategy, DDPStrategy)
    config = strategy.config
    assert (config.comm_hook, config.comm_wrapper, config.comm_state) == (
        "power_sgd",
        "fp16",
        {"matrix_approximation_rank": 2},
    )
    plain = ddp_strategy({DistributedDataParallelKwargs: DistributedDataParallelKwargs()}, "ddp", 2, "cpu")
    assert isinstance(plain, DDPStrategy)
    assert (plain.config.comm_hook, plain.config.comm_wrapper, plain.config.comm_state) == (None, None, None)


def _manual_worker(batch_size: int) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from ember import Trainer, TrainModule

    class OneBackward(TrainModule):  # manual optimization, one backward a step
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d = nn.Linear(4, 4), nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(((self.d(self.g(x)) - y) ** 2).mean())
            opt.step()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    results = {}
    for static in (False, True):
        torch.manual_seed(0)
        data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        module = OneBackward()
        strategy = DDPStrategy(DDPConfig(static_graph=static)) if batch_size == 2 else "auto"
        trainer = Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=batch_size))
        results["static" if static else "dynamic"] = [float(p.sum()) for p in module.parameters()]
    return results


def test_manual_optimization_with_one_backward_a_step_under_ddp() -> None:
    # Each step's manual backward runs inside DDP's forward (the training_step), before DDP readies
    # its reducer for a backward: the buckets DDP rebuilds after its first backward failed the second
    # step ("initialize_buckets must NOT be called during autograd execution"), and a static graph's
    # first backward all-reduced nothing (the ranks' weights parted).
    (expected,) = run_processes(_manual_worker, 4, nprocs=1)
    ranks = run_processes(_manual_worker, 2, nprocs=2)
    for kind in ("dynamic", "static"):
        assert ranks[0][kind] == ranks[1][kind], kind
        assert max(abs(a - b) for a, b in zip(ranks[0][kind], expected[kind], strict=True)) < 1e-6, kind


def test_ddpstrategy_takes_lightnings_keywords() -> None:
    # Lightning's DDPStrategy(find_unused_parameters=True, ddp_comm_hook=...): the same DDPConfig.
    strategy = DDPStrategy(find_unused_parameters=True, static_graph=False, ddp_comm_hook="fp16")
    assert strategy.config == DDPConfig(find_unused_parameters=True, comm_hook="fp16")
    assert DDPStrategy().config == DDPConfig()
    with pytest.raises(TypeError, match=r"not both"):
        DDPStrategy(DDPConfig(), static_graph=True)
    with pytest.raises(TypeError, match=r"start_method=\.\.\.\): ember does not spawn or fork"):
        DDPStrategy(start_method="spawn")
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument 'bogus'\. Valid keywords: .*find_unused"
    ):
        DDPStrategy(bogus=1)
