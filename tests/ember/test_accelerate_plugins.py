"""🤗 Accelerate's plugin arguments of the Accelerator: deepspeed_plugin / fsdp_plugin become ember's
strategy and config, gradient_accumulation_plugin the accumulation, dynamo_backend / dynamo_plugin
torch.compile in prepare, rng_types the per-pass RNG synchronisation; every refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch import nn
from torch.distributed.fsdp import CPUOffload, CPUOffloadPolicy, MixedPrecisionPolicy, ShardingStrategy
from torch.utils.data import DataLoader, TensorDataset

from ember import (
    Accelerator,
    DeepSpeedPlugin,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
)

TIMEOUT = 600  # the first DeepSpeed start on a machine compiles its comm op


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), Block(), Block(), nn.Linear(8, 1))


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def _reference(per_step: int, clip: float | None = None) -> list[float]:
    """Plain PyTorch: the same model, full global batches of ``per_step`` samples."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _data().tensors
    for start in range(0, len(x), per_step):
        optimizer.zero_grad()
        F.mse_loss(model(x[start : start + per_step]), y[start : start + per_step]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    state = model.state_dict()
    return torch.cat([state[k].flatten() for k in sorted(state)]).tolist()


def _train(accelerator: Accelerator) -> list[float]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=4))
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    state = accelerator.get_state_dict(model)
    return (
        torch.cat([state[k].flatten() for k in sorted(state)]).tolist() if accelerator.is_main_process else []
    )


# -- deepspeed_plugin ---------------------------------------------------------------------------------
def test_deepspeed_plugin_becomes_the_deepspeed_strategy_and_config() -> None:
    plugin = DeepSpeedPlugin(zero_stage=3, offload_optimizer_device="cpu", offload_param_device="cpu")
    accelerator = Accelerator(deepspeed_plugin=plugin, strategy="deepspeed")
    assert accelerator.strategy.strategy_name == "deepspeed"
    config = accelerator.strategy.config.user_config()  # type: ignore[attr-defined]
    zero = config["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    )
    assert config["gradient_clipping"] == 1.0  # Accelerate's value for an unset gradient_clipping
    config = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(gradient_clipping=0.5)
    ).strategy.config.user_config()  # type: ignore[attr-defined]
    assert (
        config["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in config["zero_optimization"]
    )
    assert config["gradient_clipping"] == 0.5


def test_hf_ds_config_is_filled_by_the_fields_and_may_be_a_json_file(tmp_path: Path) -> None:
    given = {
        "zero_optimization": {"stage": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    plugin = DeepSpeedPlugin(hf_ds_config=given, zero_stage=1, gradient_accumulation_steps=2)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    config = accelerator.strategy.config.user_config()  # type: ignore[attr-defined]
    assert config["zero_optimization"]["stage"] == 1 and config["gradient_clipping"] == 1.0
    assert accelerator.gradient_accumulation_steps == accelerator.strategy.gradient_accumulation_steps == 2  # type: ignore[attr-defined]
    assert given["zero_optimization"]["stage"] == "auto"  # the user's dict is not changed
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto"}))
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=str(path)), gradient_accumulation_steps=3
    )
    assert accelerator.strategy.config.user_config()["zero_optimization"]["stage"] == 3  # type: ignore[attr-defined]
    assert accelerator.gradient_accumulation_steps == 3  # "auto": the Accelerator's
    with pytest.raises(
        ValueError,
        match=r"DeepSpeedPlugin\(zero_stage=2\) contradicts hf_ds_config's zero_optimization.stage=3",
    ):
        DeepSpeedPlugin(hf_ds_config=str(path), zero_stage=2)


def test_hf_ds_configs_unfilled_auto_takes_accelerates_defaults() -> None:
    # DeepSpeed reads a stage of "auto" as 0: without the default the run would have no ZeRO at all.
    given = {"zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "auto"}}}
    config = DeepSpeedPlugin(hf_ds_config=given).strategy()[0].config.user_config()
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "none"}}


def test_hf_ds_configs_enabled_precision_block_is_the_runs_precision_as_in_accelerate(tmp_path: Path) -> None:
    given = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(given))
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), offload_optimizer_device="cpu")
    accelerator = Accelerator(deepspeed_plugin=plugin)
    assert (accelerator.precision.name, accelerator.mixed_precision) == ("bf16-mixed", "bf16")
    auto = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, "fp16": {"enabled": "auto"}})
    assert Accelerator(deepspeed_plugin=auto).precision.name == "32-true"  # "auto": the Accelerator's
    with pytest.raises(ValueError, match=r"bf16.enabled=True, but precision='32-true' rules out"):
        Accelerator(deepspeed_plugin=plugin, mixed_precision="no")  # a given precision is checked


def test_deepspeeds_accumulation_wins_with_a_warning_as_in_accelerate() -> None:
    with pytest.warns(UserWarning, match="given 2 steps, the DeepSpeed config 4; using DeepSpeed's"):
        accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(gradient_accumulation_steps=4), gradient_accumulation_steps=2
        )
    assert accelerator.gradient_accumulation_steps == accelerator.strategy.gradient_accumulation_steps == 4  # type: ignore[attr-defined]
    # Accelerate reads a config without the key as 1 accumulation step.
    with pytest.warns(UserWarning, match="the DeepSpeed config 1"):
        plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}})
        accelerator = Accelerator(
            deepspeed_plugin=plugin, gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=3)
        )
    assert accelerator.gradient_accumulation_steps == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offload_optimizer_device": "nvme"}, r"offload_optimizer_device='nvme'\) is not supported: ember offloads to the CPU only. Valid choices: 'none', 'cpu'"),
        ({"offload_param_device": "gpu"}, r"offload_param_device='gpu'.*Valid choices: 'none', 'cpu'"),
        ({"offload_param_device": "cpu"}, r"DeepSpeedPlugin: offload_parameters=True needs stage=3"),
        ({"zero_stage": 4}, r"zero_stage=4\) is not supported.*Valid choices: None, 0, 1, 2, 3"),
        ({"zero3_init_flag": True}, r"zero3_init_flag=True.*deepspeed.zero.Init"),
        ({"zero3_save_16bit_model": "yes"}, r"zero3_save_16bit_model='yes'\) is not supported: not a bool"),
        ({"is_train_batch_min": False}, r"is_train_batch_min=False.*micro batch"),
        ({"enable_msamp": True}, r"enable_msamp=True.*FP8"),
        ({"transformer_moe_cls_names": "Expert"}, r"transformer_moe_cls_names='Expert'"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps"),
        ({"gradient_clipping": -1.0}, r"gradient_clipping=-1.0"),
        ({"hf_ds_config": 3}, r"hf_ds_config=3 must be a DeepSpeed config dict"),
        ({"hf_ds_config": "/no/such.json"}, r"hf_ds_config='/no/such.json' is not a readable JSON file"),
    ],
)  # fmt: skip
def test_deepspeed_plugin_refusals(fields: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        DeepSpeedPlugin(**fields)


def _deepspeed_worker() -> dict[str, Any]:
    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=2)  # clipping: Accelerate's 1.0
    accelerator = Accelerator(deepspeed_plugin=plugin, dynamo_backend="eager")  # the engine compiles it
    params = _train(accelerator)
    shown = accelerator.state.deepspeed_plugin  # after prepare: the configuration the engine got
    assert shown is plugin and accelerator.deepspeed_plugin is plugin
    engine = accelerator._objects.models[0]
    return {"params": params, "micro_batch": shown.deepspeed_config["train_micro_batch_size_per_gpu"],
            "compiled": engine.is_compiled, "dynamo_calls": _dynamo_frames()}  # fmt: skip


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["frames"].values()))


def test_deepspeed_plugin_trains_like_a_plain_loop_with_accumulation_and_clipping() -> None:
    ranks = run_processes(_deepspeed_worker, nprocs=2, timeout=TIMEOUT)
    expected = _reference(per_step=2 * 4 * 2, clip=1.0)
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert ranks[0]["micro_batch"] == 4
    assert ranks[0]["compiled"] and ranks[0]["dynamo_calls"] > 0  # Accelerate's engine.compile(...)


# -- accelerator.state's plugins (Accelerate's attributes) ------------------------------------------------
def test_state_shows_the_plugins_in_use_as_accelerate_does() -> None:
    plain = Accelerator()
    assert plain.state.deepspeed_plugin is None and plain.deepspeed_plugin is None
    assert plain.state.fsdp_plugin is None and plain.state.dynamo_plugin.backend == "no"
    eager = TorchDynamoPlugin(backend="eager")
    assert Accelerator(dynamo_plugin=eager).state.dynamo_plugin is eager
    assert Accelerator(dynamo_backend="eager").state.dynamo_plugin.backend == "eager"
    given = FullyShardedDataParallelPlugin(sharding_strategy="SHARD_GRAD_OP")
    assert Accelerator(fsdp_plugin=given).state.fsdp_plugin is given
    named = Accelerator(strategy="fsdp_offload").state.fsdp_plugin  # chosen by name: a plugin describing it
    assert named is not None and named.cpu_offload is True and named.reshard_after_forward is True
    assert named.state_dict_type == "SHARDED_STATE_DICT"
    by_name = Accelerator(strategy="deepspeed_stage_3").state.deepspeed_plugin
    assert by_name is not None and by_name.zero_stage == 3
    assert (
        by_name.deepspeed_config["zero_optimization"]["stage"] == 3
        and "optimizer" not in by_name.deepspeed_config
    )


def test_deepspeed_plugins_zero_stage_and_config_read_as_in_accelerate() -> None:
    assert DeepSpeedPlugin().zero_stage == 2  # Accelerate's default
    assert DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 1}}).zero_stage == 1
    assert DeepSpeedPlugin(hf_ds_config={"train_batch_size": "auto"}).zero_stage == 0  # DeepSpeed's default
    config = DeepSpeedPlugin(zero_stage=3, offload_optimizer_device="cpu").deepspeed_config
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and len(config) == 2
    with pytest.raises(
        TypeError, match=r"deepspeed_config\['train_micro_batch_size_per_gpu'\] = 8: .*read-only"
    ):
        config["train_micro_batch_size_per_gpu"] = 8  # type: ignore[index]
    with pytest.raises(TypeError, match=r"deepspeed_config\['stage'\] = 1: .*hf_ds_config"):
        config["zero_optimization"]["stage"] = 1


def test_deepspeed_plugins_fields_take_the_configs_values_as_in_accelerate() -> None:
    given = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "gradient_clipping": 0.5,
             "gradient_accumulation_steps": 4}  # fmt: skip
    plugin = DeepSpeedPlugin(hf_ds_config=given)
    assert (plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (4, 0.5)
    assert (plugin.offload_optimizer_device, plugin.offload_param_device) == ("cpu", None)
    assert plugin.strategy()[1] == 4  # (and the plugin still describes the same run)
    auto = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"})
    assert auto.gradient_accumulation_steps is None and auto.gradient_clipping is None  # not given: ember's


# -- fsdp_plugin ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sharding", "reshard", "hybrid"),
    [(None, True, False), ("FULL_SHARD", True, False), ("shard_grad_op", False, False), (2, False, False),
     (ShardingStrategy.SHARD_GRAD_OP, False, False), ("HYBRID_SHARD", True, True), (4, True, True),
     ("4", True, True), (ShardingStrategy._HYBRID_SHARD_ZERO2, False, True)],
)  # fmt: skip
def test_sharding_strategy_forms(sharding: Any, reshard: bool, hybrid: bool) -> None:
    config = Accelerator(
        fsdp_plugin=FullyShardedDataParallelPlugin(sharding_strategy=sharding)
    ).strategy.config  # type: ignore[attr-defined]
    assert (config.reshard_after_forward, config.hybrid) == (reshard, hybrid)


def test_fsdp_plugin_fields_become_the_fsdp_config() -> None:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=False, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap="Block", activation_checkpointing=True, cpu_offload=True,
        state_dict_type="FULL_STATE_DICT", mixed_precision_policy={"param_dtype": torch.bfloat16, "reduce_dtype": "fp32"},
    )  # fmt: skip
    accelerator = Accelerator(fsdp_plugin=plugin, strategy="auto")
    config = accelerator.strategy.config  # type: ignore[attr-defined]
    assert accelerator.strategy.strategy_name == "fsdp" and accelerator.precision.name == "bf16-mixed"
    assert config.wrap == config.activation_checkpointing == {"Block"}
    assert (config.reshard_after_forward, config.offload, config.state_dict_type) == (False, True, "full")
    assert config.reduce_dtype == torch.float32
    for offload, expected in [
        (CPUOffload(offload_params=True), True),
        (CPUOffloadPolicy(pin_memory=False), True),
        (False, False),
    ]:
        assert FullyShardedDataParallelPlugin(cpu_offload=offload).strategy()[0].config.offload is expected
    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    assert FullyShardedDataParallelPlugin(mixed_precision_policy=policy).strategy()[1] == "16-mixed"
    assert FullyShardedDataParallelPlugin(mixed_precision_policy="bf16").strategy()[1] == "bf16-mixed"
    sized = (
        FullyShardedDataParallelPlugin(auto_wrap_policy="size_based_wrap", min_num_params=300)
        .strategy()[0]
        .config
    )
    model = _model()  # as Accelerate's FSDP2: every submodule above min_num_params (each Block: 552)
    assert [m for m in model.modules() if m is not model and sized.wrap(m)] == [model[1], model[2]]
    assert FullyShardedDataParallelPlugin().strategy()[0].config.wrap is None  # Accelerate's FSDP2: root only


def test_auto_wrap_policy_names_in_any_case_as_in_accelerate() -> None:
    # Accelerate upper-cases the name; its config files write it so ("TRANSFORMER_BASED_WRAP").
    plugin = FullyShardedDataParallelPlugin(
        auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_cls_names_to_wrap="Block"
    )
    assert plugin.strategy()[0].config.wrap == {"Block"}
    sized = FullyShardedDataParallelPlugin(auto_wrap_policy="Size_Based_Wrap").strategy()[0].config.wrap
    assert repr(sized) == "size_based_wrap(min_num_params=0)"
    assert FullyShardedDataParallelPlugin(auto_wrap_policy="NO_WRAP").strategy()[0].config.wrap is None


_FSDP = "FullyShardedDataParallelPlugin"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sharding_strategy": "NO_SHARD"}, r"sharding_strategy='NO_SHARD'\) is not supported: nothing is sharded.*'ddp'. Valid choices: 'FULL_SHARD'"),
        ({"sharding_strategy": 3}, r"sharding_strategy=3.*NO_SHARD|sharding_strategy=3"),
        ({"fsdp_version": 1}, r"fsdp_version=1\) is not supported: ember's FSDP strategy runs FSDP2.*Valid choices: None, 2"),
        ({"backward_prefetch": "BACKWARD_PRE"}, r"backward_prefetch='BACKWARD_PRE'.*FSDP1 option"),
        ({"state_dict_type": "LOCAL_STATE_DICT"}, r"state_dict_type='LOCAL_STATE_DICT'.*Valid choices: 'SHARDED_STATE_DICT', 'FULL_STATE_DICT'"),
        ({"param_init_fn": print}, r"param_init_fn=.*init_module\(empty_init=True\)"),
        ({"sync_module_states": True}, r"sync_module_states=True.*rank 0's weights"),
        ({"cpu_ram_efficient_loading": True}, r"cpu_ram_efficient_loading=True"),
        ({"limit_all_gathers": False}, r"limit_all_gathers=False"),
        ({"use_orig_params": False}, r"use_orig_params=False"),
        ({"ignored_modules": []}, r"ignored_modules=\[\]"),
        ({"transformer_cls_names_to_wrap": ["Block"]}, r"transformer_cls_names_to_wrap=\['Block'\].*auto_wrap_policy='transformer_based_wrap', not None"),
        ({"min_num_params": 10}, r"min_num_params=10.*'size_based_wrap'"),
        ({"auto_wrap_policy": "transformer_based_wrap"}, r"transformer_cls_names_to_wrap=None.*_no_split_modules"),
        ({"auto_wrap_policy": print}, r"auto_wrap_policy=.*Valid choices: None, 'no_wrap'"),
        ({"activation_checkpointing": True, "auto_wrap_policy": "size_based_wrap"}, r"activation_checkpointing=True.*block classes"),
        ({"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True}, r"reshard_after_forward=True\) contradicts"),
        ({"mixed_precision_policy": "fp8"}, r"mixed_precision_policy='fp8'"),
        ({"mixed_precision_policy": {"param_dtype": torch.bfloat16, "output_dtype": torch.bfloat16}}, r"output_dtype.*float32 outputs"),
        ({"cpu_offload": "yes"}, r"cpu_offload='yes'"),
    ],
)  # fmt: skip
def test_fsdp_plugin_refusals(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        FullyShardedDataParallelPlugin(**fields)
    assert str(err.value).startswith(_FSDP)


def test_a_wrap_class_name_the_model_lacks_is_an_error() -> None:
    plugin = FullyShardedDataParallelPlugin(
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Blok"]
    )
    accelerator = Accelerator(fsdp_plugin=plugin)
    with pytest.raises(
        ValueError, match=r"no submodule of class 'Blok'. Valid choices in this model: Block, Linear"
    ):
        accelerator.prepare(_model())


def _fsdp_worker() -> dict[str, Any]:
    from torch.distributed.fsdp import FSDPModule

    plugin = FullyShardedDataParallelPlugin(
        sharding_strategy="SHARD_GRAD_OP", auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"], state_dict_type="FULL_STATE_DICT",
    )  # fmt: skip
    accelerator = Accelerator(fsdp_plugin=plugin, gradient_accumulation_steps=2)
    params = _train(accelerator)
    model = accelerator._objects.models[0]
    units = [isinstance(m, FSDPModule) for m in model]
    return {"params": params, "units": units, "sharded": accelerator.strategy.sharded_checkpoints}


def test_fsdp_plugin_trains_like_a_plain_loop_on_two_processes() -> None:
    ranks = run_processes(_fsdp_worker, nprocs=2)
    assert ranks[0]["units"] == [False, True, True, False] and ranks[0]["sharded"] is False
    expected = _reference(per_step=2 * 4 * 2)
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)


# -- conflicts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fsdp_plugin": FullyShardedDataParallelPlugin(), "strategy": "ddp"}, ValueError, r"fsdp_plugin chooses the 'fsdp' strategy.*strategy='ddp'"),
        ({"deepspeed_plugin": DeepSpeedPlugin(), "strategy": "deepspeed_stage_3"}, ValueError, r"deepspeed_plugin chooses.*'deepspeed_stage_3'"),
        ({"deepspeed_plugin": DeepSpeedPlugin(), "fsdp_plugin": FullyShardedDataParallelPlugin()}, ValueError, r"either deepspeed_plugin= or fsdp_plugin="),
        ({"fsdp_plugin": FullyShardedDataParallelPlugin(mixed_precision_policy="bf16"), "mixed_precision": "fp16"}, ValueError, r"means precision='bf16-mixed', but precision='16-mixed'"),
        ({"deepspeed_plugin": object()}, TypeError, r"deepspeed_plugin=builtins.object\(...\): expected ember.DeepSpeedPlugin"),
        ({"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=2), "gradient_accumulation_steps": 2}, ValueError, r"either gradient_accumulation_steps= or gradient_accumulation_plugin="),
        ({"dynamo_backend": "eager", "dynamo_plugin": TorchDynamoPlugin()}, ValueError, r"either dynamo_backend= or dynamo_plugin="),
        ({"dynamo_backend": "bogus"}, ValueError, r"dynamo_backend='bogus'.*Valid choices: 'no', .*'eager'"),
        ({"rng_types": ["torch", "xla"]}, ValueError, r"'xla'.*not supported: ember does not synchronise the XLA"),
        ({"rng_types": ["npu"]}, ValueError, r"rng_types=\[..., 'npu', ...\] is not supported. Valid choices: 'generator', 'torch', 'cuda'"),
        ({"rng_types": ["cuda"]}, ValueError, r"device is 'cpu', which has no CUDA generator"),
        ({"rng_types": "torch"}, TypeError, r"rng_types='torch' must be a list"),
    ],
)  # fmt: skip
def test_conflicts_and_refusals_of_the_accelerator(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Accelerator(**kwargs)


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed", "bf16-mixed-instance"])
def test_a_precision_that_agrees_with_the_fsdp_policy_is_no_conflict(precision: Any) -> None:
    from ember.precision import MixedPrecision

    given = MixedPrecision("bf16-mixed") if precision == "bf16-mixed-instance" else precision
    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy="bf16")
    accelerator = Accelerator(fsdp_plugin=plugin, precision=given)
    assert accelerator.precision.name == "bf16-mixed"
    if not isinstance(given, str):
        assert accelerator.precision is given  # the plugin given is the one used


def test_gradient_accumulation_plugin_needs_num_steps_and_bools() -> None:
    with pytest.raises(ValueError, match=r"GradientAccumulationPlugin\(num_steps=None\)"):
        GradientAccumulationPlugin()
    with pytest.raises(TypeError, match="sync_each_batch"):
        GradientAccumulationPlugin(num_steps=2, sync_each_batch=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use_regional_compilation=True"):
        TorchDynamoPlugin(backend="eager", use_regional_compilation=True)
    with pytest.raises(
        ValueError, match=r"mode='max-autotune'\) is not supported: torch.compile takes mode or options"
    ):
        TorchDynamoPlugin(backend="eager", mode="max-autotune", options={"trace.enabled": True})


# -- gradient_accumulation_plugin --------------------------------------------------------------------
@pytest.mark.parametrize(("sync_with_dataloader", "expected"), [
    (True, [False, True, True, False, True, True]),  # what Accelerate 1.15 gives (probed)
    (False, [False, True, False, True, False, True]),
])  # fmt: skip
def test_sync_with_dataloader(sync_with_dataloader: bool, expected: list[bool]) -> None:
    plugin = GradientAccumulationPlugin(num_steps=2, sync_with_dataloader=sync_with_dataloader)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin)
    assert accelerator.gradient_accumulation_steps == accelerator.gradient_state.num_steps == 2
    model, loader = accelerator.prepare(nn.Linear(4, 1), DataLoader(_data(3), batch_size=1))
    seen = []
    for _ in range(2):
        for _batch in loader:
            with accelerator.accumulate(model):
                seen.append(accelerator.sync_gradients)
    assert seen == expected


@pytest.mark.parametrize("adjust_scheduler", [True, False])
def test_the_schedule_advances_on_optimizer_steps_with_either_adjust_scheduler(
    adjust_scheduler: bool,
) -> None:
    plugin = GradientAccumulationPlugin(num_steps=2, adjust_scheduler=adjust_scheduler)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model, optimizer, loader, scheduler = accelerator.prepare(
        model, optimizer, DataLoader(_data(8), batch_size=1), scheduler
    )
    lrs = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625]  # Accelerate 1.15, either value


# -- two processes: sync_each_batch, rng_types, a compiled DDP model ------------------------------------
def _ddp_worker(sync_each_batch: bool, rng_types: list[str]) -> dict[str, Any]:
    plugin = GradientAccumulationPlugin(num_steps=2, sync_each_batch=sync_each_batch)
    accelerator = Accelerator(
        gradient_accumulation_plugin=plugin, rng_types=rng_types, dynamo_backend="eager"
    )
    model = accelerator.prepare(_model())
    loader = accelerator.prepare(DataLoader(_data(8), batch_size=2))
    torch.manual_seed(100 + accelerator.process_index)  # every rank's RNG differs (_model() seeds 0)
    draws, grads = [], []
    for x, y in loader:
        draws.append(torch.rand(1).item())  # the global torch RNG inside the pass
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
        grads.append(model._orig_mod.module[0].weight.grad.clone().flatten().tolist())
    return {"draws": draws, "first_grad": grads[0], "compiled": type(model).__name__}


@pytest.mark.parametrize(("sync_each_batch", "rng_types"), [(True, ["torch"]), (False, ["generator"])])
def test_sync_each_batch_and_rng_types_on_two_processes(sync_each_batch: bool, rng_types: list[str]) -> None:
    ranks = run_processes(_ddp_worker, sync_each_batch, rng_types, nprocs=2)
    assert ranks[0]["compiled"] == "OptimizedModule"
    # micro-step 1 is no boundary: its gradients are all-reduced only with sync_each_batch
    assert (ranks[0]["first_grad"] == ranks[1]["first_grad"]) is sync_each_batch
    # "torch": rank 0's RNG state at the start of the pass, so the same draws on both ranks
    assert (ranks[0]["draws"] == ranks[1]["draws"]) is ("torch" in rng_types)


# -- dynamo ---------------------------------------------------------------------------------------------
def test_prepare_compiles_and_unwrap_model_matches_accelerate() -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    reference = Accelerator()
    expected = _train(reference)
    accelerator = Accelerator(dynamo_plugin=TorchDynamoPlugin(backend="aot_eager", fullgraph=True))
    model = _model()
    compiled = accelerator.prepare(model)
    assert isinstance(compiled, OptimizedModule) and compiled._orig_mod is model
    assert accelerator.unwrap_model(compiled) is compiled  # Accelerate: keep_torch_compile=True by default
    assert accelerator.unwrap_model(compiled, keep_torch_compile=False) is model
    assert list(accelerator.get_state_dict(compiled)) == list(model.state_dict())  # no "_orig_mod." prefix
    assert _train(Accelerator(dynamo_backend="eager")) == pytest.approx(expected, abs=1e-6)
    assert type(Accelerator(dynamo_backend="no").prepare(_model())).__name__ == "Sequential"


def test_a_model_compiled_before_prepare_keeps_its_orig_mod_names_as_in_accelerate(tmp_path: Path) -> None:
    from safetensors import safe_open
    from torch._dynamo.eval_frame import OptimizedModule

    accelerator = Accelerator()
    model = _model()
    compiled = accelerator.prepare(torch.compile(model, backend="eager"))
    assert isinstance(compiled, OptimizedModule) and compiled._orig_mod is model
    # Accelerate 1.15 (one process and DDP alike): the wrapper is the user's module, so its names
    # keep the "_orig_mod." prefix; unwrap_model returns it, or with keep_torch_compile=False the module
    names = [f"_orig_mod.{name}" for name in model.state_dict()]
    assert list(accelerator.get_state_dict(compiled)) == names
    assert list(accelerator.get_state_dict(compiled, unwrap=False)) == names
    accelerator.save_model(compiled, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert sorted(saved.keys()) == sorted(names)
    assert accelerator.unwrap_model(compiled) is compiled
    assert accelerator.unwrap_model(compiled, keep_torch_compile=False) is model
