"""Training functions shared by tests that run them in this process or on several ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator


def flat_params(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()]).tolist()


class _Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def resume_worker(ckpt: str, mode: str, stop_at: int = 7, precision: str = "32-true") -> dict:
    """mode: 'full' trains 3 epochs; 'first' stops after ``stop_at`` steps with save_state; 'resume' loads it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(44, 8, generator=g), torch.randn(44, 1, generator=g))
    accelerator = Accelerator(precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    if mode == "resume":
        accelerator.load_state(ckpt)
    losses = {}
    while loader.epoch < 3:
        for x, y in loader:
            loss = F.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step += 1
            losses[progress.step] = loss.item().hex()
            if mode == "first" and progress.step == stop_at:
                accelerator.save_state(ckpt)
                return {"losses": losses}
    return {"losses": losses, "params": [v.hex() for v in flat_params(model)], "epoch_len": len(loader)}


def check_resume(full: dict, first: dict, resumed: dict, stop_at: int) -> None:
    assert len(full["losses"]) == 3 * full["epoch_len"]
    assert first["losses"] == {k: v for k, v in full["losses"].items() if int(k) <= stop_at}
    assert min(int(k) for k in resumed["losses"]) == stop_at + 1
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > stop_at}
    assert resumed["params"] == full["params"]


def project_worker(root: str) -> dict:
    """Automatic checkpoint naming on every rank, and ``save()`` with ``save_on_each_node`` (a run
    described as one process per node writes one file per node)."""
    import os

    from ember import ProjectConfiguration

    config = ProjectConfiguration(project_dir=root, automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(project_config=config)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved = []
    for _ in range(3):
        optimizer.zero_grad()
        accelerator.backward(model(torch.ones(3, 4)).sum())
        optimizer.step()
        saved.append(os.path.basename(accelerator.save_state()))
    weights = flat_params(model)
    listed = sorted(os.listdir(os.path.join(root, "checkpoints")))
    with torch.no_grad():
        model.module.weight.zero_() if hasattr(model, "module") else model.weight.zero_()
    accelerator.load_state()
    config.save_on_each_node = True
    node = int(os.environ["GROUP_RANK"])
    accelerator.save({"node": torch.tensor(node)}, os.path.join(root, f"node{node}.pt"))
    refused = ""
    try:
        accelerator.save_state()
    except ValueError as error:
        refused = str(error)
    return {"saved": saved, "listed": listed, "restored": flat_params(model) == weights,
            "iteration": accelerator.save_iteration, "refused": refused}  # fmt: skip
