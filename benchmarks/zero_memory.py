"""Per-rank memory and step time of DeepSpeed ZeRO-1/2/3 vs DDP on the example GPT, 2 processes.

    python benchmarks/zero_memory.py                 # updates benchmarks/RESULTS.md
    python benchmarks/zero_memory.py --quick --results /tmp/R.md --ratios /tmp/ratios

The model is ``examples/gpt_fsdp.py``'s GPT, trained with AdamW on its character corpus through the
Accelerator loop. Each rank counts the bytes it holds of the model's parameters (ZeRO-3: its
partition), of fp32 master copies (ZeRO keeps them beside the module's parameters) and of the
optimizer state, and reports its peak RSS. Step times are medians over repetitions that alternate
the strategies, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import launch, machine, ratio_row, record_ratios, run_main, tensor_bytes

STRATEGIES = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpt_fsdp.py"
MEMORY_BUDGET = 0.5 * 1.05  # ZeRO-3: half of DDP's per-rank state, plus 5%


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("gpt_fsdp", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state_bytes(accelerator: Any, model: Any, optimizer: Any) -> dict[str, int]:
    strategy = accelerator.strategy
    engine = getattr(strategy, "_engine", None)
    if engine is None:  # DDP: module parameters and the torch optimizer's state
        states = [
            v for s in optimizer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ]
        return {"params": tensor_bytes(model.parameters()), "master": 0, "optimizer": tensor_bytes(states)}
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    zero = engine.optimizer
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(
        zero, "fp32_partitioned_groups_flat", []
    )
    inner = getattr(zero, "optimizer", zero)
    states = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": tensor_bytes(params),
        "master": tensor_bytes(masters),
        "optimizer": tensor_bytes(states),
    }


def worker(args: argparse.Namespace) -> None:
    from ember import Accelerator

    torch.set_num_threads(1)
    gpt = _example()
    data = gpt.CharCorpus(args.chars, args.block_size, args.batch)
    data.setup("fit")
    torch.manual_seed(0)
    module = gpt.GPT(len(data.vocab), args.block_size, args.layers, args.width, args.heads, 1e-3)
    module.configure_model()
    accelerator = Accelerator(strategy=args.worker)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(module, optimizer, data.train_dataloader())
    times = []
    for step, (x, y) in enumerate(loader):
        if step > args.steps:
            break
        start = time.perf_counter()
        logits = model(x)
        accelerator.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up (allocates the optimizer state)
            times.append(time.perf_counter() - start)
    mine: dict[str, Any] = _state_bytes(accelerator, model, optimizer)
    mine["step_s"] = statistics.median(times)
    mine["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine["numel"] = (
        sum(p.numel() for p in module.parameters()) if args.worker != "deepspeed_stage_3" else None
    )
    everyone = [mine, accelerator.broadcast_object(mine, from_process=1)]
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(everyone))
    accelerator.end_training()


def report(args: argparse.Namespace) -> str:
    argv = ["--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads),
            "--block-size", str(args.block_size), "--batch", str(args.batch), "--chars", str(args.chars),
            "--steps", str(args.steps)]  # fmt: skip
    strategies = ["ddp", *(s for s in args.strategies.split(",") if s != "ddp")]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}. Valid choices: {', '.join(STRATEGIES)}")
    results: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in strategies}
    for _ in range(args.reps):
        for strategy in strategies:  # alternate, so drifts of the machine hit every strategy
            results[strategy].append(launch(__file__, ["--worker", strategy, *argv]))
    numel = results["ddp"][0][0]["numel"]
    ddp_step = statistics.median(statistics.median(r["step_s"] for r in ranks) for ranks in results["ddp"])
    ddp_state = max(r["params"] + r["master"] + r["optimizer"] for r in results["ddp"][0])
    state = {s: [max(r["params"] + r["master"] + r["optimizer"] for r in ranks) for ranks in reps]
             for s, reps in results.items()}  # fmt: skip
    steps = {
        s: [statistics.median(r["step_s"] for r in ranks) for ranks in reps] for s, reps in results.items()
    }
    ratios = []
    for s in strategies[1:]:
        budget = MEMORY_BUDGET if s == "deepspeed_stage_3" else None
        ratios += [ratio_row(f"per-rank state: {s} / ddp", state[s], state["ddp"], budget),
                   ratio_row(f"step time: {s} / ddp", steps[s], steps["ddp"], None)]  # fmt: skip
    record_ratios(args.name, ratios, args.ratios)
    rows = []
    mb = 1e6
    for strategy, reps in results.items():
        ranks = reps[0]
        total = max(r["params"] + r["master"] + r["optimizer"] for r in ranks)
        step = statistics.median(statistics.median(r["step_s"] for r in rk) for rk in reps)
        rows.append(
            f"| {strategy} | {ranks[0]['params'] / mb:.1f} | {ranks[0]['master'] / mb:.1f} | "
            f"{ranks[0]['optimizer'] / mb:.1f} | {total / mb:.1f} ({total / ddp_state:.2f}x) | "
            f"{max(r['max_rss'] for r in ranks) / mb:.0f} | {step * 1e3:.0f} ({step / ddp_step:.2f}x) |"
        )
    return "\n".join([
        "## DeepSpeed ZeRO vs DDP: per-rank memory and step time, 2 processes",
        "",
        f"Model: examples/gpt_fsdp.py's GPT, {args.layers} blocks of width {args.width} ({numel / 1e6:.1f}M "
        f"parameters, fp32), AdamW, batch {args.batch} x {args.block_size} characters per rank, {args.steps} timed "
        f"steps x {args.reps} alternating repetitions. DeepSpeed's CPU accelerator, client torch optimizer.",
        machine(),
        "",
        "| strategy | model parameters MB | fp32 master copies MB | optimizer state MB | total per rank MB (vs DDP) "
        "| peak RSS of a rank MB | median step ms (vs DDP) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- ZeRO-1/2 keep the whole module on every rank plus a partitioned fp32 master copy; ZeRO-3 partitions "
        "the module too. Gradient buffers are not counted (DeepSpeed keeps them inside its optimizer).",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; ddp always runs")
    run_main(parser, "zero_memory", STRATEGIES, worker, report,
             quick={"layers": 1, "width": 48, "heads": 2, "chars": 20_000, "steps": 2, "reps": 1})  # fmt: skip


if __name__ == "__main__":
    main()
