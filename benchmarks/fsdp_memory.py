"""Per-rank training-state memory and step time: FSDP vs DDP on 2 processes.

    python benchmarks/fsdp_memory.py                 # ~50M parameters; updates benchmarks/RESULTS.md
    python benchmarks/fsdp_memory.py --quick --results /tmp/R.md --ratios /tmp/ratios

Each rank counts the bytes of the tensors it holds for training — parameters, gradients (after
backward) and optimizer state (Adam) — for the same model under ``strategy="ddp"`` and
``strategy="fsdp"``. Budget: FSDP <= 1/2 x DDP + 5%. The step time ratio FSDP/DDP is the median over
repetitions that alternate the two (DDP, FSDP, DDP, FSDP ...), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import launch, machine, ratio_row, record_ratios, run_main, tensor_bytes

MEMORY_BUDGET = 0.5 * 1.05  # half of DDP's per-rank state, plus 5%


def build(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        for _ in range(layers)
    ]
    return nn.Sequential(*blocks)


def worker(args: argparse.Namespace) -> None:
    """One rank (started by ``ember launch``): train, measure, rank 0 writes JSON to ``args.out``."""
    from ember import Accelerator
    from ember.strategies import FSDPConfig, FSDPStrategy

    torch.set_num_threads(1)
    strategy = FSDPStrategy(FSDPConfig(wrap={nn.Sequential})) if args.worker == "fsdp" else args.worker
    accelerator = Accelerator(strategy=strategy)
    with accelerator.init_module(empty_init=True):  # FSDP: on the meta device, each rank allocates its shards
        model = build(args.width, args.layers)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-4))
    params = list(model.parameters())
    x = torch.randn(args.batch, args.width)
    times, grads = [], 0
    for step in range(args.steps + 1):  # the first step warms up (allocates the optimizer state)
        start = time.perf_counter()
        accelerator.backward(model(x).square().mean())
        grads = tensor_bytes([p.grad for p in params if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    state = [v for s in optimizer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    mine = {
        "params": tensor_bytes(params), "grads": grads, "optimizer": tensor_bytes(state),
        "step_s": statistics.median(times), "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip
    everyone = [mine, accelerator.broadcast_object(mine, from_process=1)]
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(everyone))
    accelerator.end_training()


def run(strategy: str, args: argparse.Namespace) -> list[dict[str, float]]:
    argv = ["--worker", strategy, "--width", str(args.width), "--layers", str(args.layers),
            "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
    return launch(__file__, argv)


def report(args: argparse.Namespace) -> str:
    results: dict[str, list[list[dict[str, float]]]] = {"ddp": [], "fsdp": []}
    for _ in range(args.reps):
        for strategy in ("ddp", "fsdp"):  # alternate, so drifts of the machine hit both
            results[strategy].append(run(strategy, args))
    numel = sum(p.numel() for p in build(args.width, args.layers).parameters())
    rows = []
    per_rank = {}
    for strategy, reps in results.items():
        ranks = reps[0]
        state = [r["params"] + r["grads"] + r["optimizer"] for r in ranks]
        per_rank[strategy] = max(state)
        mb = 1e6
        rows.append(
            f"| {strategy} | {ranks[0]['params'] / mb:.1f} | {ranks[0]['grads'] / mb:.1f} | "
            f"{ranks[0]['optimizer'] / mb:.1f} | {max(state) / mb:.1f} | {max(r['max_rss'] for r in ranks) / mb:.0f} |"
        )
    memory_ratio = per_rank["fsdp"] / per_rank["ddp"]
    step = {
        s: [statistics.median(r["step_s"] for r in ranks) for ranks in reps] for s, reps in results.items()
    }
    ratios = [f / d for f, d in zip(step["fsdp"], step["ddp"], strict=True)]
    verdict = "within budget" if memory_ratio <= MEMORY_BUDGET else "OVER BUDGET"
    state = {s: [max(r["params"] + r["grads"] + r["optimizer"] for r in ranks) for ranks in reps]
             for s, reps in results.items()}  # fmt: skip
    record_ratios(args.name, [
        ratio_row("per-rank training state: fsdp / ddp", state["fsdp"], state["ddp"], MEMORY_BUDGET),
        ratio_row("step time: fsdp / ddp", step["fsdp"], step["ddp"], None),
    ], args.ratios)  # fmt: skip
    return "\n".join(
        [
            "## FSDP vs DDP: per-rank training state, 2 processes",
            "",
            f"Model: {args.layers} MLP blocks of width {args.width} ({numel / 1e6:.1f}M parameters, fp32), Adam, "
            f"batch {args.batch} per rank, {args.steps} timed steps x {args.reps} alternating repetitions.",
            machine(),
            "",
            "| strategy | parameters MB | gradients MB | optimizer state MB | total per rank MB | peak RSS of a rank MB |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- **Memory ratio FSDP / DDP: {memory_ratio:.3f}** (budget <= 0.525: {verdict}).",
            f"- Step time ratio FSDP / DDP: median {statistics.median(ratios):.2f}, spread "
            f"{min(ratios):.2f}-{max(ratios):.2f} (DDP median step {statistics.median(step['ddp']) * 1e3:.0f} ms). "
            "FSDP gathers each block's parameters in forward and backward; on CPU/gloo that communication is not "
            "overlapped as NCCL overlaps it on GPUs.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)  # 12 x 4.2M = 50M parameters
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1)
    run_main(parser, "fsdp_memory", ["ddp", "fsdp"], worker, report,
             quick={"width": 64, "layers": 2, "steps": 2, "reps": 1})  # fmt: skip


if __name__ == "__main__":
    main()
