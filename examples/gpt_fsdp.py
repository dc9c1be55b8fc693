"""A small GPT trained on the characters of Python's own standard library (on every machine: nothing
is downloaded), with the strategy of your choice.

    python examples/gpt_fsdp.py                                            # one process
    ember launch --nproc-per-node 2 examples/gpt_fsdp.py --strategy fsdp   # sharded over 2 processes
    python examples/gpt_fsdp.py --devices 2 --strategy ddp                 # the Trainer starts process 2
    ember launch --nproc-per-node 2 examples/gpt_fsdp.py --strategy deepspeed

With ``--strategy fsdp`` every transformer ``Block`` is its own shard unit and recomputes its
activations in backward; ``configure_model`` builds the layers on the meta device, so each process
only ever allocates its own shards. Checkpoints are sharded (each process writes its part);
``ember consolidate runs/gpt/checkpoints/last weights.safetensors`` makes one file of them.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import DataModule, Trainer, TrainModule
from ember.callbacks import ModelCheckpoint
from ember.strategies import FSDPConfig, FSDPStrategy, Strategy


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of the standard library's sources, in a fixed file order."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


class CharCorpus(DataModule):
    def __init__(self, chars: int, block_size: int, batch_size: int) -> None:
        self.text = stdlib_text(chars)
        self.vocab = sorted(set(self.text))
        self.block_size, self.batch_size = block_size, batch_size

    def setup(self, stage: str) -> None:
        ids = torch.tensor([self.vocab.index(c) for c in self.text])
        windows = ids[: (len(ids) - 1) // self.block_size * self.block_size + 1]
        x = windows[:-1].view(-1, self.block_size)
        y = windows[1:].view(-1, self.block_size)
        split = max(1, len(x) // 10)
        self.train, self.val = TensorDataset(x[split:], y[split:]), TensorDataset(x[:split], y[:split])

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.val, batch_size=self.batch_size)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(TrainModule):
    def __init__(self, vocab: int, block_size: int, layers: int, width: int, heads: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()

    def configure_model(self) -> None:
        # Called by the Trainer under the strategy's init context: on the meta device with FSDP.
        hp = self.hparams
        self.embed = nn.Embedding(hp["vocab"], hp["width"])
        self.position = nn.Embedding(hp["block_size"], hp["width"])
        self.blocks = nn.ModuleList(Block(hp["width"], hp["heads"]) for _ in range(hp["layers"]))
        self.norm = nn.LayerNorm(hp["width"])
        self.head = nn.Linear(hp["width"], hp["vocab"], bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=0.1)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        """Greedy continuation; every process calls it (a sharded model gathers its layers)."""
        for _ in range(new):
            logits = self(ids[:, -self.hparams["block_size"] :])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


def make_strategy(name: str | None) -> str | Strategy | None:
    if name == "fsdp":
        return FSDPStrategy(FSDPConfig(wrap={Block}, activation_checkpointing={Block}))
    return name  # "ddp", "deepspeed", ... by registry name; None: `ember launch --strategy` or "auto"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--strategy", default=None, help="ddp, fsdp, deepspeed, or any registry name (default: auto)"
    )
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--precision", default=None, help="default: 32-true, or `ember launch --precision`")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--chars", type=int, default=400_000, help="corpus size in characters")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--root", default="runs/gpt", help="logs and checkpoints go here")
    parser.add_argument("--sample", type=int, default=120, help="characters to generate at the end (0: none)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = CharCorpus(args.chars, args.block_size, args.batch_size)
    model = GPT(len(data.vocab), args.block_size, args.layers, args.width, args.heads, args.lr)
    trainer = Trainer(
        strategy=make_strategy(args.strategy),
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=min(100, args.max_steps),  # batches, counted across epochs:
        check_val_every_n_epoch=None,
        limit_val_batches=20,
        log_every_n_steps=max(1, min(10, args.max_steps // 4)),  # (a few rows on a short run too)
        default_root_dir=args.root,
        callbacks=[ModelCheckpoint(save_last=True, every_n_train_steps=min(100, args.max_steps))],
    )
    trainer.fit(model, datamodule=data)
    if args.sample:
        prompt = torch.tensor([[data.vocab.index(c) for c in "def "]], device=trainer.strategy.root_device)
        text = "".join(data.vocab[i] for i in model.generate(prompt, args.sample)[0].tolist())
        if trainer.is_global_zero:
            print(f"--- sample after {trainer.global_step} steps ---\n{text}")
            print(f"metrics: {trainer.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
