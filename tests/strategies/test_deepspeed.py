"""DeepSpeedStrategy on 2 real processes (DeepSpeed's CPU accelerator, gloo): ZeRO stages 1-3 and
offload match DDP, partitioning, the single validated configuration, checkpoints, consolidation.

DeepSpeed builds a C++ communication op the first time (about a minute); ``TORCH_EXTENSIONS_DIR``
(set by the Makefile to a cache outside the checkout) keeps the build for later runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_command, run_processes
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, CheckpointError, Trainer
from ember.strategies import STRATEGY_REGISTRY, DeepSpeedConfig, DeepSpeedStrategy

TIMEOUT = 600  # the first DeepSpeed start on a machine compiles its comm op


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 1))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))


def _train_worker(strategy: str, accumulate: int, directory: str) -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if strategy.startswith("deepspeed"):  # the registry's preset, plus clipping
        config = STRATEGY_REGISTRY.create(strategy).config.user_config()  # type: ignore[attr-defined]
        config["gradient_clipping"] = 0.5
        accelerator = Accelerator(
            strategy=DeepSpeedStrategy(DeepSpeedConfig(config=config)), gradient_accumulation_steps=accumulate
        )
    else:
        accelerator = Accelerator(strategy=strategy, gradient_accumulation_steps=accumulate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=4))
    norms = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.5)))
            optimizer.step()
            optimizer.zero_grad()
    out: dict[str, Any] = {"norms": norms}
    weights = accelerator.strategy.module_state_dict(model)
    out["weights"] = {k: v.flatten().tolist() for k, v in weights.items()}
    if strategy.startswith("deepspeed"):
        engine = accelerator.strategy.engine  # type: ignore[attr-defined]
        out["config"] = accelerator.strategy.deepspeed_config  # type: ignore[attr-defined]
        out["partition"] = [
            [int(p.ds_tensor.numel()), int(p.ds_numel)]
            for p in engine.module.parameters()
            if hasattr(p, "ds_tensor")
        ]
        states = [
            t for s in engine.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        ]
        out["state_devices"] = sorted({str(t.device) for t in states})
        if directory:
            accelerator.save_state(Path(directory) / "ckpt")
            accelerator.save_model(model, Path(directory) / "export")
            accelerator.save_state(Path(directory) / "weights", weights_only=True)
    return out


@pytest.fixture(scope="module")
def ddp_reference() -> dict[str, Any]:
    return run_processes(_train_worker, "ddp", 2, "", nprocs=2)[0]  # type: ignore[no-any-return]


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize(
    "strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_2_offload"]
)
def test_zero_stages_match_ddp(strategy: str, ddp_reference: dict[str, Any], tmp_path: Path) -> None:
    saves = strategy in ("deepspeed_stage_2", "deepspeed_stage_3")  # checkpoints: the default and ZeRO-3
    ranks = run_processes(
        _train_worker, strategy, 2, str(tmp_path) if saves else "", nprocs=2, timeout=TIMEOUT
    )
    result = ranks[0]
    # The same data and accumulation: equal up to fp32 reduction order (DeepSpeed reduces in buckets).
    for name, values in ddp_reference["weights"].items():
        torch.testing.assert_close(
            torch.tensor(result["weights"][name]), torch.tensor(values), rtol=1e-5, atol=1e-6
        )
    # The norm the engine clipped with, the same as DDP's total norm before clipping.
    torch.testing.assert_close(
        torch.tensor(result["norms"]), torch.tensor(ddp_reference["norms"]), rtol=1e-5, atol=1e-6
    )
    config = result["config"]
    assert config["gradient_accumulation_steps"] == 2 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    if strategy == "deepspeed_stage_3":
        for rank in ranks:  # each rank keeps about half of every parameter
            for local, full in rank["partition"]:
                assert local == -(-full // 2)
    if strategy.endswith("offload"):
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert result["state_devices"] == ["cpu"]
    if not saves:
        return
    # checkpoints: DeepSpeed's own files for resume, safetensors for everyone else
    ckpt = tmp_path / "ckpt"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "deepspeed"
    export = load_file(str(tmp_path / "export" / "model.safetensors"))
    weights_only = load_file(str(tmp_path / "weights" / "model.safetensors"))  # gathered from the engine
    for name, values in result["weights"].items():
        assert export[name].flatten().tolist() == values
        assert weights_only[name].flatten().tolist() == values
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    assert manifest["layout"] == "full" and manifest["weights_only"] and manifest["counts"] == {"models": 1}
    out = tmp_path / "consolidated.safetensors"
    done = run_command([sys.executable, "-m", "ember", "consolidate", str(ckpt), str(out)], timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    plain = _model()
    plain.load_state_dict(load_file(str(out)))  # the consolidated file loads into a plain module
    for name, value in plain.state_dict().items():
        assert value.flatten().tolist() == result["weights"][name]


def test_trainer_resumes_exactly_from_zero3_engine_checkpoints(tmp_path: Path) -> None:
    from trainer_workers import assert_logged_the_rest, fit

    strategy = "deepspeed_stage_3"
    # A crashed run's resume is tested on DDP (tests/trainer/test_exactness.py); here the engine's
    # checkpoint is resumed in a new directory.
    full = run_processes(fit, str(tmp_path / "a"), "full", 0, "", 2, strategy, nprocs=2, timeout=TIMEOUT)
    ckpt = tmp_path / "a" / "checkpoints" / "epoch=1-step=4"
    resumed = run_processes(
        fit, str(tmp_path / "b"), "resume", 0, str(ckpt), 2, strategy, nprocs=2, timeout=TIMEOUT
    )
    assert_logged_the_rest(full[0]["rows"], resumed[0]["rows"], from_step=4)
    assert resumed[0]["params"] == full[0]["params"] and full[0]["params"]
    assert json.loads((ckpt / "manifest.json").read_text())["layout"] == "deepspeed"
    accelerator = Accelerator()  # another strategy: a clear way out, not a half-loaded model
    with pytest.raises(
        CheckpointError, match="strategy='deepspeed', or take its weights with `ember consolidate`"
    ):
        accelerator.load_state(ckpt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": DeepSpeedStrategy(DeepSpeedConfig(config={"gradient_accumulation_steps": 4})),
          "gradient_accumulation_steps": 2},
         r"config says gradient_accumulation_steps=4, but the Accelerator's gradient_accumulation_steps .* is 2"),
        ({"strategy": DeepSpeedStrategy(DeepSpeedConfig(config={"fp16": {"enabled": True}})), "precision": "bf16-mixed"},
         r"config says fp16\.enabled=True, but precision='bf16-mixed' rules out DeepSpeed's fp16 mode"),
        ({"strategy": DeepSpeedStrategy(DeepSpeedConfig(config={"bf16": {"enabled": True}}))},
         r"bf16\.enabled=True, but precision='32-true' rules out"),
        ({"strategy": "deepspeed", "precision": "16-mixed"}, "does not support on the CPU; use 'bf16-mixed'"),
        ({"strategy": "deepspeed", "precision": "64-true"}, r"precision='64-true' is not supported by DeepSpeed"),
    ],
)  # fmt: skip
def test_contradictions_are_refused_before_anything_starts(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Accelerator(**kwargs)  # refused in connect(), before launch() could start another process


def test_bad_deepspeed_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage=5 is not a ZeRO stage"):
        DeepSpeedConfig(stage=5)
    with pytest.raises(ValueError, match="offload_parameters=True needs stage=3"):
        DeepSpeedConfig(stage=2, offload_parameters=True)
    with pytest.raises(ValueError, match="pass either config= or the typed options, not both: stage"):
        DeepSpeedConfig(stage=3, config={})
    with pytest.raises(ValueError, match="is not a dict or an existing JSON file"):
        DeepSpeedConfig(config=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DeepSpeedConfig(config=str(tmp_path / "bad.json"))
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 0.25}))
    with pytest.raises(
        ValueError, match=r"gradient_clipping=0\.25, but Trainer\(gradient_clip_val=\.\.\.\) is 1\.0"
    ):
        Trainer(strategy=DeepSpeedStrategy(DeepSpeedConfig(config=str(tmp_path / "ds.json"))), devices=1,
                gradient_clip_val=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value': DeepSpeed clips by norm only"):
        Trainer(strategy="deepspeed", devices=1, gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_settings_known_later_are_not_judged_early() -> None:
    from ember.precision import resolve_precision
    from ember.strategies import ProcessEnvironment

    # Matching values, and a total batch that only the dataloader's batch size can confirm.
    config = {
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
        "train_batch_size": 64,
        "gradient_clipping": 1.0,
    }
    strategy = DeepSpeedStrategy(DeepSpeedConfig(config=config))
    strategy.configure_training(gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    strategy.gradient_accumulation_steps = 2
    strategy.connect(device_type="cpu", num_processes=2, precision=resolve_precision("bf16-mixed", device_type="cpu"),
                     environment=ProcessEnvironment(source="single"))  # fmt: skip


def _multinode_worker() -> dict[str, Any]:
    accelerator = Accelerator(strategy="deepspeed_stage_3")  # 2 nodes x 2 processes, one rendezvous
    model = _model()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), DataLoader(_data(), batch_size=2)
    )
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
    engine = accelerator.strategy.engine  # type: ignore[attr-defined]
    weights = accelerator.strategy.module_state_dict(model)
    return {"node": accelerator.strategy.node_rank, "partition": [int(p.ds_tensor.numel()) for p in engine.module.parameters()],
            "weights": {k: v.flatten().tolist() for k, v in weights.items()}}  # fmt: skip


def test_scheduler_block_and_client_scheduler_conflict_and_multinode() -> None:
    config = {
        "zero_optimization": {"stage": 2},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}},
    }
    accelerator = Accelerator(strategy=DeepSpeedStrategy(DeepSpeedConfig(config=config)))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="config has a 'scheduler' block, and the loop also steps a StepLR"):
        accelerator.prepare(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1))
    ranks = run_processes(_multinode_worker, nprocs=4, nodes=2, timeout=TIMEOUT)
    assert [r["node"] for r in ranks] == [0, 0, 1, 1]
    assert all(r["weights"] == ranks[0]["weights"] for r in ranks)  # one model across both nodes
    assert ranks[0]["partition"] == [10, 3, 3, 1]  # each of 4 ranks holds a quarter (40, 10, 10, 1 elements)


def _bf16_worker() -> dict[str, Any]:
    accelerator = Accelerator(strategy="deepspeed", precision="bf16-mixed")
    model = _model()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), DataLoader(_data(), batch_size=4)
    )
    losses = []
    for x, y in loader:
        loss = F.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        optimizer.step()
        losses.append(float(loss))
    engine = accelerator.strategy.engine  # type: ignore[attr-defined]
    return {"dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}), "losses": losses,
            "bf16": accelerator.strategy.deepspeed_config["bf16"]["enabled"]}  # type: ignore[attr-defined]  # fmt: skip


def test_bf16_mixed_runs_in_deepspeeds_bf16_mode() -> None:
    result = run_processes(_bf16_worker, nprocs=2, timeout=TIMEOUT)[0]
    assert result["bf16"] is True and result["dtypes"] == ["torch.bfloat16"]
    assert all(torch.isfinite(torch.tensor(result["losses"]))) and result["losses"][-1] < result["losses"][0]


def _config_optimizer_worker(directory: str) -> dict[str, Any]:
    # DeepSpeed's own optimizer from the config block, stepped by the engine. ``torch_adam`` keeps
    # DeepSpeed from JIT-compiling its CPU Adam (minutes of gcc on a cold cache); ember's path is the same.
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}  # fmt: skip
    accelerator = Accelerator(strategy=DeepSpeedStrategy(DeepSpeedConfig(config=config)))
    model, loader = accelerator.prepare(_model(), DataLoader(_data(), batch_size=4))
    losses = []
    for x, y in loader:
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        losses.append(float(loss))
    return {"optimizer": type(accelerator.strategy.engine.basic_optimizer).__name__, "losses": losses}  # type: ignore[attr-defined]


def test_optimizer_from_the_config_block_with_offload(tmp_path: Path) -> None:
    ranks = run_processes(_config_optimizer_worker, str(tmp_path), nprocs=2, timeout=TIMEOUT)
    assert ranks[0]["optimizer"] == "AdamW"  # DeepSpeed's "Adam" defaults to adam_w_mode
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
