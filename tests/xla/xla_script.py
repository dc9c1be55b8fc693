"""Run by ``ember launch --strategy xla`` in tests/xla: train, use every collective, save a checkpoint.

Usage: ``ember launch --strategy xla [--nproc-per-node N] tests/xla/xla_script.py OUT_DIR``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator


def main(out: Path) -> None:
    accelerator = Accelerator()  # strategy and precision from `ember launch`
    world, rank = accelerator.num_processes, accelerator.process_index
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    # The reference: one CPU process over the global batches, plain PyTorch.
    reference, ref_optimizer = make()
    for x, y in DataLoader(data, batch_size=8 * world):
        F.mse_loss(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_optimizer.step()
        ref_optimizer.zero_grad()

    model, optimizer = make()
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=8))
    for x, y in loader:
        accelerator.backward(F.mse_loss(model(x), y))
        accelerator.clip_grad_norm_(model.parameters(), 0.5)  # of the gradients averaged over replicas
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(out / "checkpoint")
    weight = accelerator.unwrap_model(model).weight.detach().cpu()
    value = torch.tensor([rank + 1.0])
    result = {
        "strategy": accelerator.strategy.strategy_name,
        "world_size": world,
        "rank": rank,
        "sum": accelerator.reduce(torch.cat([value, value]), "sum").tolist(),
        "max": accelerator.reduce(value, "max").tolist(),
        "gathered": accelerator.gather(value.unsqueeze(0)).tolist(),
        "broadcast": accelerator.broadcast(value, 0).tolist(),
        "weight": weight.tolist(),
        "max_diff_to_reference": (weight - reference.weight.detach()).abs().max().item(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
