"""FSDPConfig against Lightning's FSDPStrategy options: torch's FSDP1 wrapping policies, activation
checkpointing by predicate, an explicit hybrid ``device_mesh``, Lightning's names refused with ember's."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch import nn
from torch.distributed.fsdp.wrap import (
    CustomPolicy,
    ModuleWrapPolicy,
    size_based_auto_wrap_policy,
    transformer_auto_wrap_policy,
)
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator
from ember.strategies import STRATEGY_REGISTRY, FSDPConfig, FSDPStrategy


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(), Block()])  # 2 x 2,128 parameters
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


@pytest.mark.parametrize(
    "policy",
    [
        ModuleWrapPolicy({Block}),
        CustomPolicy(_is_block),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}),
        functools.partial(size_based_auto_wrap_policy, min_num_params=2000),
    ],
    ids=["ModuleWrapPolicy", "CustomPolicy", "transformer_auto_wrap_policy", "size_based_auto_wrap_policy"],
)
def test_wrap_takes_torchs_wrapping_policies(policy: object) -> None:
    # What Lightning's auto_wrap_policy (FSDP1's) accepts picks the same units as under FSDP1.
    net = Net()
    units = FSDPStrategy(FSDPConfig(wrap=policy))._units(net)  # type: ignore[arg-type]
    assert len(units) == 2 and {id(u) for u in units} == {id(b) for b in net.blocks}


def test_a_policy_with_per_module_fsdp1_settings_is_refused() -> None:
    policy = CustomPolicy(lambda m: {"sharding_strategy": "NO_SHARD"} if isinstance(m, Block) else False)
    with pytest.raises(ValueError, match="wrap=CustomPolicy.*per-module FSDP1 settings"):
        FSDPStrategy(FSDPConfig(wrap=policy))._units(Net())


@pytest.mark.parametrize(
    ("option", "match"),
    [
        (
            {"sharding_strategy": "SHARD_GRAD_OP"},
            r"sharding_strategy='SHARD_GRAD_OP' is reshard_after_forward=False",
        ),
        (
            {"sharding_strategy": "no_shard"},
            r"sharding_strategy='no_shard'.*strategy='ddp'.*device_mesh=\(world_size, 1\)",
        ),
        ({"sharding_strategy": "HYBRID_SHARD"}, r"is hybrid=True"),
        ({"auto_wrap_policy": {Block}}, r"auto_wrap_policy is FSDPConfig\(wrap=\.\.\.\)"),
        ({"activation_checkpointing_policy": {Block}}, r"is FSDPConfig\(activation_checkpointing=\.\.\.\)"),
        ({"cpu_offload": True}, r"cpu_offload is FSDPConfig\(offload=True\)"),
        ({"mixed_precision": object()}, r"precision='bf16-mixed'.*reduce_dtype"),
        ({"limit_all_gathers": True}, r"limit_all_gathers: FSDP2 always"),
        ({"use_orig_params": True}, r"use_orig_params: FSDP2 always"),
        ({"sync_module_states": True}, r"sync_module_states.*init_module\(empty_init=True\)"),
        ({"min_num_params": 10}, r"min_num_params is FSDPConfig\(min_params=\.\.\.\)"),
        ({"process_group": None}, r"process_group.*device_mesh"),
    ],
)
def test_lightning_option_names_say_what_ember_calls_them(option: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        FSDPConfig(**option)
    with pytest.raises(TypeError, match=match):
        FSDPStrategy(**option)  # Lightning's FSDPStrategy(sharding_strategy=...)


def test_fsdpstrategy_takes_fsdpconfig_fields_as_keywords() -> None:
    assert FSDPStrategy(offload=True, min_params=7).config == FSDPConfig(offload=True, min_params=7)
    with pytest.raises(TypeError, match=r"give the options in the FSDPConfig or as keywords, not both"):
        FSDPStrategy(FSDPConfig(), offload=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        FSDPConfig(bogus=1)  # type: ignore[call-arg]


def test_lightnings_fsdp_cpu_offload_name() -> None:
    strategy = STRATEGY_REGISTRY.create("fsdp_cpu_offload")
    assert isinstance(strategy, FSDPStrategy) and strategy.config.offload


def test_bad_device_mesh_and_activation_checkpointing() -> None:
    for bad in [(2,), (2, 0), [1, 2], "2x1", (1.0, 2)]:
        with pytest.raises(ValueError, match=r"device_mesh=.*tuple \(replicas, shards\)"):
            FSDPConfig(device_mesh=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"device_mesh=\(1, 2\) is a hybrid mesh.*hybrid=False"):
        FSDPConfig(device_mesh=(1, 2), hybrid=False)
    with pytest.raises(ValueError, match=r"activation_checkpointing='Block'"):
        FSDPConfig(activation_checkpointing="Block")  # type: ignore[arg-type]
    # Lightning's deprecated activation_checkpointing=Block: a class is callable, but no predicate
    for option in ("activation_checkpointing", "wrap"):
        with pytest.raises(ValueError, match=rf"{option}=.*Block.*a set of nn.Module classes"):
            FSDPConfig(**{option: Block})
    with pytest.raises(ValueError, match=r"device_mesh=\(2, 1\)\) has 2 processes, but this job has 1"):
        Accelerator(strategy=FSDPStrategy(FSDPConfig(device_mesh=(2, 1))))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g))


def _mesh_worker() -> dict:
    from torch.distributed._composable import checkpoint

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = FSDPConfig(
        device_mesh=(2, 1), wrap=ModuleWrapPolicy({Block}), activation_checkpointing=_is_block
    )
    accelerator = Accelerator(strategy=FSDPStrategy(config))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=4))
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    full = accelerator.strategy.module_state_dict(model)
    return {
        "mesh": list(accelerator.strategy.device_mesh.shape),
        "replicated": all(list(p.to_local().shape) == list(p.shape) for p in model.parameters()),
        "checkpointed": [isinstance(m, Block) for m in model.modules() if checkpoint.state(m) is not None],
        "params": torch.cat([full[k].flatten() for k in sorted(full)]).tolist() if accelerator.is_main_process else [],
    }  # fmt: skip


def test_device_mesh_replicates_and_trains_as_one_process() -> None:
    # device_mesh=(2, 1): two replicas of one shard each (Lightning's NO_SHARD through HSDP), the wrap
    # policy and checkpointing predicate as Lightning passes them.
    ranks = run_processes(_mesh_worker, nprocs=2)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _data().tensors
    for start in range(0, 32, 8):  # 2 ranks x batch 4
        optimizer.zero_grad()
        F.mse_loss(model(x[start : start + 8]), y[start : start + 8]).backward()
        optimizer.step()
    state = model.state_dict()
    expected = torch.cat([state[k].flatten() for k in sorted(state)])
    for rank in ranks:
        assert rank["mesh"] == [2, 1] and rank["replicated"]
        assert rank["checkpointed"] == [True, True]  # the two blocks, nothing else
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), expected, rtol=1e-5, atol=1e-6)
