"""The Trainer is bit-exact: against a hand-written loop, and across a crash and `fit(ckpt_path=...)`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from dist_helpers import run_processes
from torch.utils.data import DataLoader, RandomSampler
from trainer_workers import dataset, fit, fit_epochs

from ember import Trainer, TrainModule


class Plain(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        return [optimizer], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5), "interval": "step"}
        ]


def test_trainer_matches_a_hand_written_loop_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(42)  # the prepared loader's shuffle seed is torch.initial_seed() + epoch
    module = Plain()
    reference = Plain()
    reference.load_state_dict(module.state_dict())
    trainer = Trainer(max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.3, default_root_dir=str(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, logger=False)  # fmt: skip
    trainer.fit(module, DataLoader(dataset(), batch_size=4, shuffle=True))

    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    steps = 0
    for epoch in range(2):
        # The prepared loader shuffles epoch e with a sampler generator seeded initial_seed + e.
        sampler = RandomSampler(dataset(), generator=torch.Generator().manual_seed(42 + epoch))
        loader = DataLoader(dataset(), batch_size=4, sampler=sampler)
        batches = list(loader)
        for i, (x, y) in enumerate(batches):
            (F.cross_entropy(reference.net(x), y) / 3).backward()
            if (i + 1) % 3 == 0 or i + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
                steps += 1
    assert trainer.global_step == steps == 8
    for ours, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def _check(full: dict, resumed: dict) -> None:
    assert resumed["rows"] == full["rows"]  # metrics.csv, every value, bit for bit
    assert resumed["params"] == full["params"]
    assert resumed["step"] == full["step"] == 15


def test_resume_after_crash_is_exact_single_process(tmp_path: Path) -> None:
    full = fit(str(tmp_path / "a"), "full")
    crashed = fit(str(tmp_path / "b"), "crash", crash_at=7)
    assert crashed == {"crashed": 7}
    # 10 batches per epoch, accumulation 2: 5 optimizer steps per epoch; step 6 is mid-epoch 1.
    ckpt = tmp_path / "b" / "checkpoints" / "epoch=1-step=6"
    resumed = fit(str(tmp_path / "b"), "resume", resume=str(ckpt))
    assert resumed["log_dir"] == str(tmp_path / "b" / "logs" / "version_0")  # the same run's log continues
    _check(full, resumed)
    assert len(full["rows"]) > 20 and "train_acc_epoch" in full["rows"][0]


def test_resume_after_crash_is_exact_on_two_ranks(tmp_path: Path) -> None:
    # 5 batches per rank and epoch, accumulation 2: optimizer steps 1-3 in epoch 0, 4-6 in epoch 1.
    # The training accuracy is a torchmetrics object: its state resumes exactly too.
    full = run_processes(fit, str(tmp_path / "a"), "full", 0, "", 2, "auto", True, nprocs=2)
    run_processes(fit, str(tmp_path / "b"), "crash", 5, "", 2, "auto", True, nprocs=2)
    ckpt = str(tmp_path / "b" / "checkpoints" / "epoch=1-step=4")  # mid-epoch 1
    resumed = run_processes(fit, str(tmp_path / "b"), "resume", 0, ckpt, 2, "auto", True, nprocs=2)
    assert resumed[0]["rows"] == full[0]["rows"] and len(full[0]["rows"]) > 5
    for rank in range(2):
        assert resumed[rank]["params"] == full[rank]["params"]
    assert full[0]["params"] == full[1]["params"]
    assert resumed[0]["step"] == full[0]["step"] == 9


def test_resume_from_an_end_of_epoch_checkpoint_is_exact(tmp_path: Path) -> None:
    full = fit_epochs(str(tmp_path / "a"), 3)
    fit_epochs(str(tmp_path / "b"), 2, then_test=True)  # 'last' is saved after epoch 1's validation
    resumed = fit_epochs(str(tmp_path / "b"), 3, resume="last")
    assert resumed["params"] == full["params"]
    assert resumed["lr"] == full["lr"] < 0.05  # ReduceLROnPlateau saw the same val_loss after the resume
    keys = [k for k in full["rows"][0] if k != "test_loss"]
    assert [{k: r[k] for k in keys} for r in resumed["rows"]] == [
        {k: r[k] for k in keys} for r in full["rows"]
    ]
