"""The seed loop: a plain PyTorch training loop made distributed by four lines of ember.

    python examples/accelerate_loop.py                       # one process
    ember launch --nproc-per-node 2 examples/accelerate_loop.py   # DDP on 2 processes
    ember launch --nproc-per-node 2 --precision bf16-mixed examples/accelerate_loop.py

The data is generated (a noisy 4-class problem), so nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator


def make_data(n: int, teacher: torch.Tensor, generator: torch.Generator) -> TensorDataset:
    x = torch.randn(n, 32, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(n, 4, generator=generator)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    data_rng = torch.Generator().manual_seed(1234)
    teacher = torch.randn(32, 4, generator=data_rng)
    training_dataloader = DataLoader(
        make_data(2048, teacher, data_rng), batch_size=args.batch_size, shuffle=True
    )
    eval_dataloader = DataLoader(make_data(500, teacher, data_rng), batch_size=64)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs * len(training_dataloader)
    )

    accelerator = Accelerator()
    model, optimizer, training_dataloader, scheduler = accelerator.prepare(
        model, optimizer, training_dataloader, scheduler
    )
    eval_dataloader = accelerator.prepare(eval_dataloader)
    accelerator.print(
        f"{accelerator.num_processes} process(es), strategy={type(accelerator.strategy).__name__}, "
        f"precision={accelerator.precision.name}, device={accelerator.device}"
    )

    for epoch in range(args.epochs):
        model.train()
        for source, targets in training_dataloader:
            optimizer.zero_grad()
            output = model(source)
            loss = F.cross_entropy(output, targets)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()

        model.eval()
        correct = total = 0
        with torch.no_grad():
            for source, targets in eval_dataloader:
                predictions = model(source).argmax(dim=1)
                predictions, targets = accelerator.gather_for_metrics((predictions, targets))
                correct += int((predictions == targets).sum())
                total += targets.numel()
        mean_loss = accelerator.reduce(loss.detach(), "mean")
        accelerator.print(
            f"epoch {epoch}: train loss {mean_loss.item():.4f}  eval accuracy {correct / total:.3f} "
            f"on {total} samples"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
