"""NonFiniteGuard: a NaN/Inf loss or gradient stops the fit (naming the step and the parameter) or
skips the step (weights untouched, training goes on); on by default in the Trainer."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import Callback, ModelCheckpoint, NonFiniteGuard

STEPS = 6


def _data(n: int = 4 * STEPS) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


class Net(TrainModule):
    """Two layers; ``nan_loss_at`` makes the loss NaN at that step (and the gradients too, unless
    ``finite_grads``: a NaN constant added to the loss has no gradient), on ``nan_rank`` only if
    given; ``inf_grad_at`` makes the gradient of ``head.weight`` Inf (the loss stays finite)."""

    def __init__(
        self,
        nan_loss_at: int = -1,
        inf_grad_at: int = -1,
        nan_rank: int | None = None,
        finite_grads: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 1)
        self.nan_loss_at, self.inf_grad_at, self.nan_rank = nan_loss_at, inf_grad_at, nan_rank
        self.finite_grads = finite_grads
        self.head.weight.register_hook(self._grad_hook)

    def _grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.inf) if self.global_step == self.inf_grad_at else grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch[0]), batch[1])
        rank_matches = self.nan_rank is None or self.trainer.global_rank == self.nan_rank
        if self.global_step == self.nan_loss_at and rank_matches:
            loss = loss + torch.tensor(float("nan")) if self.finite_grads else loss * float("nan")
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


class WeightLog(Callback):
    """The weights after each optimizer step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": str(tmp_path), "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "logger": False, "max_epochs": 1,
    }  # fmt: skip
    return Trainer(**{**defaults, **kwargs})


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=4)


def test_on_by_default_and_configurable(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    assert [c.mode for c in trainer._callbacks if isinstance(c, NonFiniteGuard)] == ["stop"]
    trainer = _trainer(tmp_path, non_finite="skip")
    assert [c.mode for c in trainer._callbacks if isinstance(c, NonFiniteGuard)] == ["skip"]
    assert not any(isinstance(c, NonFiniteGuard) for c in _trainer(tmp_path, non_finite=None)._callbacks)
    mine = NonFiniteGuard(mode="skip", check_every_n_steps=5)
    assert [c for c in _trainer(tmp_path, callbacks=[mine])._callbacks if isinstance(c, NonFiniteGuard)] == [
        mine
    ]
    with pytest.raises(ValueError, match="non_finite='raise'. Valid choices: 'stop', 'skip', None"):
        Trainer(non_finite="raise")
    with pytest.raises(ValueError, match="valid choices are 'stop', 'skip'"):
        NonFiniteGuard(mode="warn")
    with pytest.raises(ValueError, match=r"check_every_n_steps=0\) must be None or an int >= 1"):
        NonFiniteGuard(check_every_n_steps=0)


def test_checking_every_step_stops_at_the_nan_loss_step(tmp_path: Path) -> None:
    guard = NonFiniteGuard(check_every_n_steps=1)
    with pytest.raises(FloatingPointError) as caught:
        _trainer(tmp_path, callbacks=[guard]).fit(Net(nan_loss_at=3), _loader())
    message = str(caught.value)
    assert "the loss is not finite (on rank 0)" in message
    assert "at step 3 (epoch 0, batch 3)" in message
    assert "the gradient of parameter 'body.weight' contains NaN" in message  # the first, in optimizer order


def test_default_guard_names_the_step_and_no_checkpoint_is_saved_after_it(tmp_path: Path) -> None:
    # The default checks every log_every_n_steps-th step in full; the losses in between are kept
    # on the device and checked before a checkpoint is written, and at the end.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(tmp_path, callbacks=[saver], enable_checkpointing=True, log_every_n_steps=50)
    with pytest.raises(FloatingPointError) as caught:
        trainer.fit(Net(nan_loss_at=3), _loader())
    message = str(caught.value)
    assert (
        "the loss is not finite (on rank 0) at step 3 (epoch 0, batch 3), found at the check of step 4"
        in message
    )
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=1", "epoch=0-step=2", "epoch=0-step=3"]  # the NaN update of step 3 is not
    for name in saved:
        weights = load_file(tmp_path / "ckpt" / name / "model.safetensors")
        assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    # Without checkpoints, the end of training is the check.
    with pytest.raises(
        FloatingPointError, match=r"at step 3 \(epoch 0, batch 3\), found at the check of step 6"
    ):
        _trainer(tmp_path).fit(Net(nan_loss_at=3), _loader())
    # An Inf gradient with a finite loss makes the weights, hence the next loss, non-finite.
    with pytest.raises(FloatingPointError, match=r"the loss is not finite \(on rank 0\) at step 3 "):
        _trainer(tmp_path).fit(Net(inf_grad_at=2), _loader())
    _trainer(tmp_path).fit(Net(), _loader())  # finite: no false alarm at the checks or the end


def test_on_the_cpu_only_a_bad_loss_is_kept_between_checks(tmp_path: Path) -> None:
    # Reading a CPU loss waits for nothing: the guard reads each one at once and keeps none of the
    # finite ones (49 small tensors kept alive between checks slowed every step's allocations).
    kept: list[list[Any]] = []

    class Spy(Callback):
        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            kept.append([value for _, value in guard._pending])

    guard = NonFiniteGuard()
    trainer = _trainer(tmp_path, callbacks=[guard, Spy()], log_every_n_steps=50)
    with pytest.raises(
        FloatingPointError, match=r"at step 3 \(epoch 0, batch 3\), found at the check of step 6"
    ):
        trainer.fit(Net(nan_loss_at=3, finite_grads=True), _loader())
    assert kept[:3] == [[], [], []]
    assert all(len(k) == 1 and isinstance(k[0], float) and math.isnan(k[0]) for k in kept[3:])


def test_inf_gradient_names_the_parameter(tmp_path: Path) -> None:
    guard = NonFiniteGuard(check_every_n_steps=1)
    with pytest.raises(FloatingPointError) as caught:
        _trainer(tmp_path, callbacks=[guard]).fit(Net(inf_grad_at=2), _loader())
    message = str(caught.value)
    assert "the gradient of parameter 'head.weight' contains Inf at step 2" in message
    assert "loss" not in message.split(" at step")[0]  # the loss was finite


def test_skip_leaves_the_weights_and_trains_on(tmp_path: Path) -> None:
    log, guard = WeightLog(), NonFiniteGuard(mode="skip")
    trainer = _trainer(tmp_path, callbacks=[log, guard])
    module = Net(nan_loss_at=2)
    trainer.fit(module, _loader())
    assert trainer.global_step == STEPS and guard.skipped_steps == 1
    for name in log.after[1]:  # step 2 changed nothing (not even momentum or weight decay) ...
        assert torch.equal(log.after[2][name], log.after[1][name])
        assert not torch.equal(log.after[3][name], log.after[2][name])  # ... and training went on
    # The same as a plain PyTorch loop that never took that step.
    reference = Net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step, (x, y) in enumerate(_loader()):
        if step == 2:
            continue
        F.mse_loss(reference(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0)


def test_check_every_n_steps(tmp_path: Path) -> None:
    # The Inf gradient of step 1 is not checked; the weights it made NaN are, at step 2.
    guard = NonFiniteGuard(check_every_n_steps=2)
    with pytest.raises(FloatingPointError, match="the loss is not finite .* at step 2 "):
        _trainer(tmp_path, callbacks=[guard]).fit(Net(inf_grad_at=1), _loader())


def test_gradients_are_left_to_the_grad_scaler_under_16_mixed(tmp_path: Path) -> None:
    log = WeightLog()
    trainer = _trainer(tmp_path, precision="16-mixed", callbacks=[log])
    trainer.fit(Net(inf_grad_at=2), _loader())  # no error: the scaler skips the step itself
    assert trainer.global_step == STEPS
    for name in log.after[1]:
        assert torch.equal(log.after[2][name], log.after[1][name])


def test_every_dtype_without_false_alarms() -> None:
    # A float16 gradient of finite values whose 2-norm overflows float16 is finite (it is summed in
    # float32); float64, bfloat16 and a parameter without a gradient are checked too (a fake
    # Trainer: one process).
    params = {
        "fp16": torch.nn.Parameter(torch.zeros(4, dtype=torch.float16)),
        "bf16": torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)),
        "unused": torch.nn.Parameter(torch.zeros(4)),
        "fp64": torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
    }
    module = torch.nn.ParameterDict(params)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu")), precision=None, strategy=None, world_size=1,
        global_rank=0, global_step=0, current_epoch=0, state=SimpleNamespace(global_step=0, epoch=0, batch_idx=0), log_every_n_steps=50,
    )  # fmt: skip
    guard = NonFiniteGuard(check_every_n_steps=1)
    guard.on_train_start(trainer, module)  # type: ignore[arg-type]
    params["fp16"].grad = torch.full((4,), 60000.0, dtype=torch.float16)  # norm 120000 > float16's max
    params["bf16"].grad = torch.full((4,), 1e15, dtype=torch.bfloat16)
    params["fp64"].grad = torch.full((4,), 1e100, dtype=torch.float64)
    guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
    params["fp64"].grad[2] = math.inf
    with pytest.raises(FloatingPointError, match="the gradient of parameter 'fp64' contains Inf at step 0"):
        guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
    params["fp16"].grad[0] = math.nan
    with pytest.raises(FloatingPointError, match="the gradient of parameter 'fp16' contains NaN"):
        guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]


def _ddp_skip(root: str) -> dict[str, Any]:
    log, guard = WeightLog(), NonFiniteGuard(mode="skip")
    trainer = _trainer(Path(root), callbacks=[log, guard], strategy="ddp", devices=2)
    trainer.fit(Net(nan_loss_at=2, nan_rank=1, finite_grads=True), DataLoader(_data(8 * STEPS), batch_size=4))
    step1, step2 = log.after[1], log.after[2]
    return {
        "skipped": guard.skipped_steps,
        "unchanged": all(torch.equal(step1[k], step2[k]) for k in step1),
        "weights": [v.flatten().tolist() for v in log.after[-1].values()],
    }


def test_ranks_agree_when_only_one_sees_a_nan_loss(tmp_path: Path) -> None:
    # Rank 1's loss is NaN at step 2, rank 0's is not, and the gradients DDP averages are finite:
    # every rank must still skip that step, or the replicas would differ from then on.
    results = run_processes(_ddp_skip, str(tmp_path), nprocs=2, timeout=120)
    assert [r["skipped"] for r in results] == [1, 1]
    assert all(r["unchanged"] for r in results)
    assert results[0]["weights"] == results[1]["weights"]


def _ddp_stop(root: str) -> str:
    trainer = _trainer(Path(root), strategy="ddp", devices=2)
    try:
        trainer.fit(
            Net(nan_loss_at=2, nan_rank=1, finite_grads=True), DataLoader(_data(8 * STEPS), batch_size=4)
        )
    except FloatingPointError as error:
        return str(error)
    return "no error"


def test_default_guard_agrees_across_ranks(tmp_path: Path) -> None:
    # Only rank 1 kept a NaN loss (step 2, between checks): both ranks stop at the end, naming it.
    messages = run_processes(_ddp_stop, str(tmp_path), nprocs=2, timeout=120)
    for message in messages:
        assert (
            "the loss is not finite (on rank 1) at step 2 (epoch 0, batch 2), found at the check of step 6"
            in (message)
        )


def test_sharded_gradients_are_checked_on_their_local_shard() -> None:
    # FSDP's gradients are DTensors; the guard checks the shard each rank holds (one process here,
    # a gloo group of one, so the shard is the whole tensor).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    mesh = init_device_mesh("cpu", (1,))
    weight = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]))
    module = torch.nn.ParameterDict({"weight": weight})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu")), precision=None, strategy=None, world_size=1,
        global_rank=0, global_step=3, current_epoch=0, state=SimpleNamespace(global_step=3, epoch=0, batch_idx=3), log_every_n_steps=50,
    )  # fmt: skip
    guard = NonFiniteGuard(check_every_n_steps=1)
    guard.on_train_start(trainer, module)  # type: ignore[arg-type]
    weight.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
    weight.grad = distribute_tensor(
        torch.tensor([[1.0, 1.0], [1.0, math.inf], [1.0, 1.0], [1.0, 1.0]]), mesh, [Shard(0)]
    )
    with pytest.raises(FloatingPointError, match="the gradient of parameter 'weight' contains Inf at step 3"):
        guard.on_before_optimizer_step(trainer, module, optimizer)  # type: ignore[arg-type]
