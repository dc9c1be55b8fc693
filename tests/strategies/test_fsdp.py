"""FSDPStrategy (FSDP2) on 2 real processes: shards, numerics, precision policy, offload, activation
checkpointing, accumulation, clipping, errors (checkpoints: test_fsdp_checkpoints.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator
from ember.strategies import FSDPConfig, FSDPStrategy


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 1))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g))


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def _train_worker(accumulate: int) -> dict:
    model = _model()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-2
    )  # created before prepare: re-bound to the shards
    strategy = FSDPStrategy(FSDPConfig(wrap={Block}))
    accelerator = Accelerator(strategy=strategy, gradient_accumulation_steps=accumulate)
    full_shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=4))
    local_shapes = {name: list(p.to_local().shape) for name, p in model.named_parameters()}
    grads_during_accumulation = []
    norms = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            if (
                not accelerator.sync_gradients
            ):  # no reduce-scatter ran: the sharded gradients do not exist yet
                grads_during_accumulation.append(all(p.grad is None for p in model.parameters()))
            else:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 1e9)))
            optimizer.step()
            optimizer.zero_grad()
    full = accelerator.strategy.module_state_dict(model)
    return {
        "rank": accelerator.process_index, "full_shapes": full_shapes, "local_shapes": local_shapes, "norms": norms,
        "no_grads_while_accumulating": grads_during_accumulation,
        "params": torch.cat([full[k].flatten() for k in sorted(full)]).tolist() if accelerator.is_main_process else [],
        "optimizer_ok": {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()},
    }  # fmt: skip


def _reference(accumulate: int) -> tuple[list[float], list[float]]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _data().tensors
    per_step = 8 * accumulate  # 2 ranks x batch 4 x accumulation
    norms = []
    for start in range(0, 32, per_step):
        optimizer.zero_grad()
        F.mse_loss(model(x[start : start + per_step]), y[start : start + per_step]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))
        optimizer.step()
    state = model.state_dict()
    return torch.cat([state[k].flatten() for k in sorted(state)]).tolist(), norms


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fsdp_shards_and_matches_full_batch_training(accumulate: int) -> None:
    ranks = run_processes(_train_worker, accumulate, nprocs=2)
    for rank in ranks:
        assert rank["optimizer_ok"]
        for name, shape in rank["full_shapes"].items():  # each rank holds its half of every parameter's rows
            chunks = torch.arange(shape[0]).chunk(
                2
            )  # FSDP2's Shard(0): torch.chunk, the last rank may get less
            rows = len(chunks[rank["rank"]]) if rank["rank"] < len(chunks) else 0
            assert rank["local_shapes"][name] == [rows, *shape[1:]]
        assert rank["no_grads_while_accumulating"] == [True] * ((4 // accumulate) * (accumulate - 1))
    params, norms = _reference(accumulate)
    # Sharded reduce-scatter sums in another order than one process: equal within fp32 rounding.
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(params), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["norms"]), torch.tensor(norms), rtol=1e-5, atol=1e-6)
    assert ranks[0]["norms"] == ranks[1]["norms"]  # the total norm over all shards, the same everywhere


def _policy_worker() -> dict:
    strategy = FSDPStrategy(FSDPConfig(wrap={Block}, offload=True, activation_checkpointing={Block}))
    accelerator = Accelerator(strategy=strategy, precision="bf16-mixed")
    model = accelerator.prepare(_model())
    seen = []
    model[1].fc1.register_forward_hook(lambda m, i, o: seen.append(str(m.weight.dtype)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(torch.randn(4, 8)).float().sum()
    accelerator.backward(loss)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()
    states = [s for state in optimizer.state.values() for s in state.values() if isinstance(s, torch.Tensor)]
    return {
        "dtypes": seen, "saved": sum(saved), "sharded_dtype": str(next(model.parameters()).dtype),
        "state_on_cpu": all(s.device.type == "cpu" for s in states) and bool(states),
    }  # fmt: skip


def _no_ac_saved_worker() -> int:
    accelerator = Accelerator(strategy=FSDPStrategy(FSDPConfig(wrap={Block})), precision="bf16-mixed")
    model = accelerator.prepare(_model())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(torch.randn(4, 8)).float().sum()
    return sum(saved)


def test_precision_policy_offload_and_activation_checkpointing() -> None:
    ranks = run_processes(_policy_worker, nprocs=2)
    without = run_processes(_no_ac_saved_worker, nprocs=2)
    for rank, plain in zip(ranks, without, strict=True):
        assert set(rank["dtypes"]) == {
            "torch.bfloat16"
        }  # gathered parameters in bf16 (forward and its recompute)
        assert rank["sharded_dtype"] == "torch.float32"  # fp32 master shards
        assert rank["state_on_cpu"]
        assert rank["saved"] < plain  # the checkpointed blocks kept fewer activations for backward


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="wrap='all'"):
        FSDPConfig(wrap="all")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        FSDPConfig(activation_checkpointing={1})  # type: ignore[arg-type]
    assert FSDPConfig(wrap={"Block"}, activation_checkpointing={"Block"}).wrap == {
        "Block"
    }  # names are looked up
    with pytest.raises(ValueError, match=r"precision='bf16-true' keeps everything in torch\.bfloat16"):
        Accelerator(strategy=FSDPStrategy(FSDPConfig(reduce_dtype=torch.float32)), precision="bf16-true")


def test_auto_wrap_picks_blocks_bottom_up() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(16, 16)
            self.blocks = nn.ModuleList([Block(), Block()])  # 2 x 2,128 parameters
            self.head = nn.Linear(16, 2)

    strategy = FSDPStrategy(FSDPConfig(wrap="auto", min_params=2000))
    net = Net()
    assert strategy._units(net) == [net.blocks[0], net.blocks[1]]  # never the ModuleList, never the root
    assert FSDPStrategy(FSDPConfig(wrap={nn.Linear}))._units(net)[0] is net.head
    assert FSDPStrategy(FSDPConfig(wrap=None))._units(net) == []


def test_trainer_with_fsdp_resumes_exactly(tmp_path: Path) -> None:
    from trainer_workers import assert_logged_the_rest, fit

    # A crashed run's resume is tested on DDP (tests/trainer/test_exactness.py); here FSDP's own part,
    # its sharded checkpoint, is resumed in a new directory.
    full = run_processes(fit, str(tmp_path / "a"), "full", 0, "", 2, "fsdp", nprocs=2)
    ckpt = str(tmp_path / "a" / "checkpoints" / "epoch=1-step=4")  # mid-epoch 1
    resumed = run_processes(fit, str(tmp_path / "b"), "resume", 0, ckpt, 2, "fsdp", nprocs=2)
    assert_logged_the_rest(full[0]["rows"], resumed[0]["rows"], from_step=4)
    assert resumed[0]["params"] == full[0]["params"] and full[0]["params"]
    assert resumed[0]["step"] == full[0]["step"] == 9


def _meta_worker(precision: str) -> dict:
    from ember import Trainer, TrainModule

    class Lazy(TrainModule):
        def configure_model(self) -> None:  # built on the meta device, materialised shard by shard
            self.net = nn.Sequential(Block(), Block(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.mse_loss(self.net(torch.cat([x, x], dim=1)), y.to(x.dtype))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Lazy()
    trainer = Trainer(strategy=FSDPStrategy(FSDPConfig(wrap={Block})), precision=precision, max_epochs=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    weights = [p.to_local() for p in module.parameters()]
    return {
        "devices": sorted({str(p.device) for p in module.parameters()}),
        "dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "finite": all(bool(torch.isfinite(w).all()) for w in weights),
        "bounded": max(float(w.abs().max()) for w in weights if w.numel()) < 1.0,  # reset_parameters ran
        "step": trainer.global_step,
    }


def test_configure_model_builds_on_meta_and_64_true() -> None:
    for rank in run_processes(_meta_worker, "32-true", nprocs=2):
        assert rank == {
            "devices": ["cpu"],
            "dtypes": ["torch.float32"],
            "finite": True,
            "bounded": True,
            "step": 4,
        }
    for rank in run_processes(_meta_worker, "64-true", nprocs=2):
        assert rank["dtypes"] == ["torch.float64"] and rank["finite"] and rank["step"] == 4
