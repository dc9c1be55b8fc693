"""DeepSpeedConfig's options that Lightning's DeepSpeedStrategy and Accelerate's DeepSpeedPlugin
take: each reaches the DeepSpeed configuration (or the engine call) it names, and a contradiction
with the Accelerator's settings fails when the Accelerator is built."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_in_subprocess
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, DeepSpeedPlugin
from ember.precision import resolve_precision
from ember.strategies import DeepSpeedConfig, DeepSpeedStrategy, ProcessEnvironment

TIMEOUT = 600  # the first DeepSpeed start on a machine compiles its comm op


def _filled(config: DeepSpeedConfig, precision: str = "32-true") -> dict[str, Any]:
    """The configuration ``connect`` checks (what ``prepare`` hands the engine, less the batch sizes)."""
    strategy = DeepSpeedStrategy(config)
    strategy.connect(device_type="cuda", num_processes=1, precision=resolve_precision(precision, device_type="cuda"),
                     environment=ProcessEnvironment(source="single"))  # fmt: skip
    return strategy._fill_config(config.user_config(), check_only=True)


def test_lightning_zero_options_reach_the_configuration() -> None:
    zero = _filled(
        DeepSpeedConfig(
            stage=3,
            offload_optimizer=True,
            offload_parameters=True,
            pin_memory=True,
            sub_group_size=1000,
            reduce_scatter=False,
            allgather_partitions=False,
        )
    )["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["sub_group_size"] == 1000
    assert zero["reduce_scatter"] is False and zero["allgather_partitions"] is False


def test_fp16_loss_scaling_reaches_the_fp16_block() -> None:
    config = DeepSpeedConfig(loss_scale=128.0, initial_scale_power=8, loss_scale_window=50, hysteresis=3,
                             min_loss_scale=0.5)  # fmt: skip
    fp16 = _filled(config, "16-mixed")["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 128.0, "initial_scale_power": 8, "loss_scale_window": 50,
                    "hysteresis": 3, "min_loss_scale": 0.5}  # fmt: skip
    # Under another precision the engine would drop them without a word: refused when the Accelerator is built.
    with pytest.raises(ValueError, match=r"DeepSpeedConfig\(loss_scale=128\.0, initial_scale_power=8, .*\) set "
                                         r"DeepSpeed's fp16 loss scaling, but precision='bf16-mixed'"):  # fmt: skip
        Accelerator(strategy=DeepSpeedStrategy(config), precision="bf16-mixed")


def test_activation_checkpointing_block() -> None:
    block = _filled(DeepSpeedConfig(partition_activations=True, cpu_checkpointing=True,
                                    synchronize_checkpoint_boundary=True))["activation_checkpointing"]  # fmt: skip
    assert block == {
        "partition_activations": True,
        "cpu_checkpointing": True,
        "synchronize_checkpoint_boundary": True,
    }
    assert "activation_checkpointing" not in DeepSpeedConfig().user_config()


def test_options_outside_the_deepspeed_configuration_go_with_config() -> None:
    config = DeepSpeedConfig(config={"zero_optimization": {"stage": 1}}, process_group_backend="gloo",
                             logging_level=logging.INFO, exclude_frozen_parameters=True,
                             timeout=timedelta(minutes=5))  # fmt: skip
    strategy = DeepSpeedStrategy(config)
    strategy.connect(device_type="cuda", num_processes=1, precision=resolve_precision("32-true", device_type="cuda"),
                     environment=ProcessEnvironment(source="single"))  # fmt: skip
    assert strategy.process_group_backend == "gloo"  # not nccl, though the device is CUDA
    assert DeepSpeedStrategy().process_group_backend == "gloo"  # (not connected: no CUDA device)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"pin_memory": True}, ValueError, r"pin_memory=True needs offload_optimizer=True or offload_parameters=True"),
        ({"sub_group_size": 0}, ValueError, r"DeepSpeedConfig\(sub_group_size=0\) must be an int >= 1"),
        ({"loss_scale": -1.0}, ValueError, r"DeepSpeedConfig\(loss_scale=-1\.0\) must be a finite number >= 0"),
        ({"hysteresis": 0}, ValueError, r"DeepSpeedConfig\(hysteresis=0\) must be an int >= 1"),
        ({"process_group_backend": "tcp"}, ValueError, r"process_group_backend='tcp' is not a torch.distributed"),
        ({"logging_level": "loud"}, TypeError, r"DeepSpeedConfig\(logging_level='loud'\) must be an int"),
        ({"partition_activations": 1}, TypeError, r"DeepSpeedConfig\(partition_activations=1\) must be True or False"),
        ({"config": {}, "sub_group_size": 8}, ValueError, r"not both: sub_group_size would be ignored"),
        ({"config": {}, "loss_scale": 8.0}, ValueError, r"not both: loss_scale would be ignored"),
    ],
)  # fmt: skip
def test_bad_new_options(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DeepSpeedConfig(**kwargs)


def test_plugin_zero3_save_16bit_model_reaches_the_configuration() -> None:
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_save_16bit_model=True)
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    given = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"}}
    filled = DeepSpeedPlugin(hf_ds_config=given, zero3_save_16bit_model=True).deepspeed_config
    assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    given["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ValueError, match=r"DeepSpeedPlugin\(zero3_save_16bit_model=True\) contradicts hf_ds_config's "
                                         r"zero_optimization\.stage3_gather_16bit_weights_on_model_save=False"):  # fmt: skip
        DeepSpeedPlugin(hf_ds_config=given, zero3_save_16bit_model=True)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))


def _engine_worker(directory: str) -> dict[str, Any]:
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import checkpointing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].requires_grad_(False)  # a frozen layer, left out of the checkpoint
    config = DeepSpeedConfig(stage=2, sub_group_size=1000, reduce_scatter=False, partition_activations=True,
                             cpu_checkpointing=True, logging_level=logging.ERROR, exclude_frozen_parameters=True,
                             process_group_backend="gloo")  # fmt: skip
    accelerator = Accelerator(strategy=DeepSpeedStrategy(config))
    model, optimizer, loader = accelerator.prepare(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        DataLoader(_data(), batch_size=4),
    )
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
    engine = accelerator.strategy.engine  # type: ignore[attr-defined]
    accelerator.save_state(Path(directory) / "ckpt")
    saved = torch.load(next(Path(directory).rglob("mp_rank_00_model_states.pt")), weights_only=False)[
        "module"
    ]
    before = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    accelerator.load_state(Path(directory) / "ckpt")
    after = accelerator.unwrap_model(model).state_dict()
    return {
        "sub_group_size": engine._config.zero_config.sub_group_size,
        "reduce_scatter": engine._config.zero_config.reduce_scatter,
        "partition_activations": checkpointing.PARTITION_ACTIVATIONS,
        "cpu_checkpoint": checkpointing.CPU_CHECKPOINT,
        "logging_level": deepspeed.utils.logging.logger.level,
        "saved": sorted(saved),
        "restored": all(torch.equal(before[k], after[k]) for k in before),
    }


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_engine_gets_the_options(tmp_path: Path) -> None:
    result = run_in_subprocess(_engine_worker, str(tmp_path), timeout=TIMEOUT)
    assert result["sub_group_size"] == 1000 and result["reduce_scatter"] is False
    assert result["partition_activations"] is True and result["cpu_checkpoint"] is True
    assert result["logging_level"] == logging.ERROR
    assert result["saved"] == ["2.bias", "2.weight"]  # the frozen first layer is not saved
    assert result["restored"]


def test_lightnings_constructor_forms() -> None:
    strategy = DeepSpeedStrategy(
        stage=3, offload_optimizer=True, logging_level=logging.INFO
    )  # Lightning's keywords
    assert strategy.config == DeepSpeedConfig(stage=3, offload_optimizer=True, logging_level=logging.INFO)
    given = {"zero_optimization": {"stage": 1}}
    from_dict = DeepSpeedStrategy(
        config=given, process_group_backend="gloo"
    )  # Lightning's config=<dict or path>
    assert from_dict.config == DeepSpeedConfig(config=given, process_group_backend="gloo")
    assert DeepSpeedStrategy(given).config.user_config() == given
    with pytest.raises(TypeError, match=r"give the options in the DeepSpeedConfig or as keywords, not both"):
        DeepSpeedStrategy(DeepSpeedConfig(), stage=3)


@pytest.mark.parametrize(
    ("owner", "name", "message"),
    [
        (DeepSpeedStrategy, "offload_optimizer_device", r"DeepSpeedStrategy\(offload_optimizer_device=\.\.\.\): .*"
                                                        r"offload_optimizer=True.*\"nvme\""),
        (DeepSpeedConfig, "nvme_path", r"DeepSpeedConfig\(nvme_path=\.\.\.\): .*config="),
        (DeepSpeedConfig, "remote_device", r"remote_device=\.\.\.\): .*deepspeed\.zero\.Init"),
        (DeepSpeedStrategy, "zero_optimization", r"zero_optimization=\.\.\.\): .*stage=0"),
        (DeepSpeedStrategy, "logging_batch_size_per_gpu", r"first prepared dataloader"),
        (DeepSpeedStrategy, "load_full_weights", r"load_full_weights=\.\.\.\): .*before prepare"),
        (DeepSpeedStrategy, "contiguous_memory_optimization", r"number_checkpoints"),
        (DeepSpeedConfig, "no_such_option", r"unexpected keyword argument 'no_such_option'"),
    ],
)  # fmt: skip
def test_lightning_options_ember_spells_otherwise_say_what_to_write(
    owner: Any, name: str, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        owner(**{name: True})


def test_config_path_from_pl_deepspeed_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's DeepSpeedStrategy loads this file when it is given no config, its typed ZeRO options
    # (a registry name's stage=3 too) then ignored; a config given in the code wins over the variable.
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 3}')
    monkeypatch.setenv("PL_DEEPSPEED_CONFIG_PATH", str(path))
    from ember.strategies import STRATEGY_REGISTRY

    for strategy in (
        DeepSpeedStrategy(),
        DeepSpeedStrategy(stage=3, timeout=timedelta(seconds=7)),
        STRATEGY_REGISTRY.create("deepspeed_stage_3"),
    ):
        assert strategy.config.config == str(path)
        assert _filled(strategy.config)["zero_optimization"] == {"stage": 1}
    assert DeepSpeedStrategy(stage=3, timeout=timedelta(seconds=7)).config.timeout == timedelta(seconds=7)
    given = {"zero_optimization": {"stage": 2}}
    assert DeepSpeedStrategy(config=given).config.user_config() == given
    assert DeepSpeedStrategy(DeepSpeedConfig(config=given)).config.user_config() == given


@pytest.mark.parametrize("content", [None, "{not json"])
def test_bad_pl_deepspeed_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("PL_DEEPSPEED_CONFIG_PATH", str(path))
    problem = "is not valid JSON" if content else "is not an existing JSON file"
    message = f"environment variable PL_DEEPSPEED_CONFIG_PATH={str(path)!r} {problem}"
    with pytest.raises(ValueError, match=re.escape(message)):
        DeepSpeedStrategy()
