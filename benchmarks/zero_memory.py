"""Per-rank training state and step time of DeepSpeed ZeRO-1/2/3 vs DDP on the example GPT, 2 processes.

    python benchmarks/zero_memory.py                 # updates benchmarks/RESULTS.md
    python benchmarks/zero_memory.py --quick --results /tmp/R.md --ratios /tmp/ratios

The model is ``examples/gpt_fsdp.py``'s GPT, trained with AdamW on its character corpus through the
Accelerator loop, in fp32 (``32-true``) and in ``bf16-mixed``. Each rank counts, at the moment before
an optimizer step (gradients reduced, optimizer state allocated), the bytes it holds of

- parameters: the module's (ZeRO-3: its partition, plus the small parameters ZeRO-3 keeps whole),
- gradients: DDP's ``.grad``; ZeRO's gradient partitions (and any full gradients it still holds),
- fp32 master copies: the partition ZeRO's optimizer updates (DDP: none, its parameters are fp32),
- optimizer state: AdamW's moments (and step counters),

each tensor's memory counted once even where two of them share it. ``expected`` is the same sum on
paper from the parameter count. Step times are medians over repetitions that alternate the
strategies, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import launch, machine, ratio_row, record_ratios, run_main

STRATEGIES = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = ("32-true", "bf16-mixed")
PARTS = ("params", "grads", "master", "optimizer")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpt_fsdp.py"
MEMORY_BUDGET = 0.5 * 1.05  # ZeRO-3: half of DDP's per-rank state, plus 5%
# Where the budget applies: bf16-mixed, ZeRO's use. In fp32 DeepSpeed 0.19.8 keeps a second fp32 copy
# of ZeRO-3's parameter partition (see ``expected_bytes``), which no sharding removes.
BUDGETED = ("bf16-mixed", "deepspeed_stage_3")  # (precision, strategy)


def expected_bytes(strategy: str, precision: str, numel: int, whole: int, world: int = 2) -> dict[str, float]:
    """Per-rank bytes on paper for ``numel`` parameters, ``whole`` of which ZeRO-3 keeps unpartitioned.

    DDP keeps fp32 parameters in both precisions (bf16-mixed is autocast): 4 + 4 (gradients) + 8 (AdamW's
    two moments) bytes per parameter. DeepSpeed's bf16 mode keeps bf16 parameters and gradients and an
    fp32 master copy (2 + 2 + 4 + 8); in fp32 the master copy is a second fp32 copy (4 + 4 + 4 + 8):
    DeepSpeed 0.19.8 means to reuse the parameter partition there (stage3.py, ``_create_fp32_partitions``)
    but compares ``tensor.device == "cpu"`` (a ``torch.device`` with a string: always False), so it
    clones. Every stage holds only its partition of the reduced gradients at the step (ZeRO-1 too: DeepSpeed
    frees the full gradients once they are reduced into the partition).
    """
    if strategy == "ddp":
        return {"params": 4 * numel, "grads": 4 * numel, "master": 0, "optimizer": 8 * numel}
    low = 2 if precision == "bf16-mixed" else 4
    share = numel / world
    params = low * (share + whole) if strategy == "deepspeed_stage_3" else low * numel
    grads = low * share
    return {"params": params, "grads": grads, "master": 4 * share, "optimizer": 8 * share}


def distinct_bytes(groups: dict[str, Iterable[torch.Tensor | None]]) -> dict[str, int]:
    """Bytes of each group's tensors, memory shared with an earlier tensor (of any group) counted once:
    a view or an alias adds nothing. Groups are counted in order."""
    seen: list[tuple[int, int]] = []
    out = {}
    for name, tensors in groups.items():
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            t = t.to_local() if hasattr(t, "to_local") else t
            low = t.data_ptr()
            high = low + t.numel() * t.element_size()  # the tensors counted here are contiguous
            new = high - low - sum(max(0, min(high, b) - max(low, a)) for a, b in _merge(seen))
            total += new
            seen.append((low, high))
        out[name] = total
    return out


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _states(optimizer: Any) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _ddp_state(model: Any, optimizer: Any) -> dict[str, int]:
    """After backward, before the step: the module's parameters and gradients, the torch optimizer's state."""
    params = list(model.parameters())
    return distinct_bytes({"params": params, "grads": [p.grad for p in params], "master": [],
                           "optimizer": _states(optimizer.optimizer)})  # fmt: skip


def _zero_state(engine: Any) -> dict[str, int]:
    """Inside ``engine.step`` (ember's backward runs DeepSpeed's backward, then its step), before the update."""
    zero = engine.optimizer
    module = list(engine.module.parameters())
    params = [t for p in module for t in (p.data, getattr(p, "ds_tensor", None))]
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
    averaged = getattr(zero, "averaged_gradients", {}) or {}
    grads = [
        *(t for p in module for t in (p.grad, getattr(p, "grad_accum", None))),
        *(t for group in averaged.values() for t in (group or [])),
        getattr(zero, "grads_in_partition", None),
        getattr(zero, "grad_partitions_flat_buffer", None),
        *(m.grad for m in masters),
    ]
    inner = getattr(zero, "optimizer", zero)
    return distinct_bytes({"params": params, "grads": grads, "master": masters, "optimizer": _states(inner)})


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("gpt_fsdp", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> None:
    from ember import Accelerator

    torch.set_num_threads(1)
    gpt = _example()
    data = gpt.CharCorpus(args.chars, args.block_size, args.batch)
    data.setup("fit")
    torch.manual_seed(0)
    module = gpt.GPT(len(data.vocab), args.block_size, args.layers, args.width, args.heads, 1e-3)
    module.configure_model()
    numel = sum(p.numel() for p in module.parameters())
    accelerator = Accelerator(strategy=args.worker, precision=args.precision)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(module, optimizer, data.train_dataloader())
    engine = getattr(accelerator.strategy, "_engine", None)
    measured: dict[str, int] = {}
    if engine is not None:  # DeepSpeed steps inside ember's backward: measure as its step begins
        engine_step = engine.step

        def step_and_measure(*a: Any, **kw: Any) -> Any:
            if measuring:
                measured.update(_zero_state(engine))
            return engine_step(*a, **kw)

        engine.step = step_and_measure
    times = []
    for step, (x, y) in enumerate(loader):
        measuring = step == args.steps + 1  # an untimed last step, after the optimizer state exists
        start = time.perf_counter()
        logits = model(x)
        accelerator.backward(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()))
        if measuring and engine is None:
            measured.update(_ddp_state(model, optimizer))
        optimizer.step()
        optimizer.zero_grad()
        if measuring:
            break
        if step:  # the first step warms up (allocates the optimizer state)
            times.append(time.perf_counter() - start)
    if not measured:
        raise SystemExit(
            f"the loader ran out before step {args.steps + 1}: give more --chars or fewer --steps"
        )
    whole = sum(p.ds_numel for p in getattr(engine.optimizer, "persistent_parameters", [])) if engine else 0
    mine: dict[str, Any] = {**measured, "numel": numel, "whole": whole, "step_s": statistics.median(times),
                            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip
    everyone = [mine, accelerator.broadcast_object(mine, from_process=1)]
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(everyone))
    accelerator.end_training()


def total(rank: dict[str, Any]) -> float:
    return float(sum(rank[part] for part in PARTS))


def report(args: argparse.Namespace) -> str:
    argv = ["--layers", str(args.layers), "--width", str(args.width), "--heads", str(args.heads),
            "--block-size", str(args.block_size), "--batch", str(args.batch), "--chars", str(args.chars),
            "--steps", str(args.steps)]  # fmt: skip
    strategies = ["ddp", *(s for s in args.strategies.split(",") if s and s != "ddp")]
    precisions = [p for p in args.precisions.split(",") if p]
    for given, valid, option in (
        (strategies, STRATEGIES, "--strategies"),
        (precisions, PRECISIONS, "--precisions"),
    ):
        unknown = sorted(set(given) - set(valid))
        if unknown or not given:
            raise SystemExit(f"{option}: unknown {unknown or given}. Valid choices: {', '.join(valid)}")
    cases = [(p, s) for p in precisions for s in strategies]
    results: dict[tuple[str, str], list[list[dict[str, Any]]]] = {c: [] for c in cases}
    for _ in range(args.reps):
        for precision, strategy in cases:  # alternate, so drifts of the machine hit every strategy
            argv_case = ["--worker", strategy, "--precision", precision, *argv]
            results[(precision, strategy)].append(launch(__file__, argv_case))
    numel = results[cases[0]][0][0]["numel"]
    # Bytes are the same in every repetition; the step time varies.
    state = {c: [max(total(r) for r in ranks) for ranks in reps] for c, reps in results.items()}
    steps = {
        c: [statistics.median(r["step_s"] for r in ranks) for ranks in reps] for c, reps in results.items()
    }
    ratios, rows = [], []
    mb = 1e6
    for precision, strategy in cases:
        case, ddp = (precision, strategy), (precision, "ddp")
        ranks = results[case][0]
        big = max(ranks, key=total)
        paper = sum(expected_bytes(strategy, precision, big["numel"], big["whole"]).values())
        paper_ddp = sum(expected_bytes("ddp", precision, numel, 0).values())
        if strategy != "ddp":
            budget = MEMORY_BUDGET if case == BUDGETED else None
            memory = ratio_row(
                f"per-rank state: {strategy} / ddp ({precision})", state[case], state[ddp], budget
            )
            memory["expected"] = paper / paper_ddp
            ratios += [
                memory,
                ratio_row(f"step time: {strategy} / ddp ({precision})", steps[case], steps[ddp], None),
            ]
        ddp_state, ddp_step = statistics.median(state[ddp]), statistics.median(steps[ddp])
        step = statistics.median(steps[case])
        rows.append(
            f"| {precision} | {strategy} | "
            + " | ".join(f"{big[part] / mb:.1f}" for part in PARTS)
            + f" | **{total(big) / mb:.1f} ({total(big) / ddp_state:.3f}x)** | {paper / mb:.1f} "
            f"({paper / paper_ddp:.3f}x) | {max(r['max_rss'] for r in ranks) / mb:.0f} | "
            f"{step * 1e3:.0f} ({step / ddp_step:.2f}x) |"
        )
    record_ratios(args.name, ratios, args.ratios)
    verdicts = [
        f"- **{r['case'].split(': ')[1]}: {r['ratio']:.3f}** (budget <= {r['budget']:g}: "
        f"{'within budget' if r['ratio'] <= r['budget'] else 'OVER BUDGET'})."
        for r in ratios
        if r["budget"] is not None
    ]
    whole = max(r["whole"] for reps in results.values() for r in reps[0])
    fp32 = next((f"{r['ratio']:.3f}x" for r in ratios if r["case"] == "per-rank state: deepspeed_stage_3 / ddp "
                 "(32-true)"), "0.625x on paper")  # fmt: skip
    return "\n".join([
        "## DeepSpeed ZeRO vs DDP: per-rank training state and step time, 2 processes",
        "",
        f"Model: examples/gpt_fsdp.py's GPT, {args.layers} blocks of width {args.width} ({numel / 1e6:.2f}M "
        f"parameters), AdamW, batch {args.batch} x {args.block_size} characters per rank, {args.steps} timed "
        f"steps x {args.reps} alternating repetitions. DeepSpeed's CPU accelerator, client torch optimizer.",
        machine(),
        "",
        "Counted on each rank just before an optimizer step (gradients reduced, optimizer state allocated), "
        "each byte once; the larger rank is shown. Expected: the same on paper from the parameter count.",
        "",
        "| precision | strategy | parameters MB | gradients MB | fp32 master copies MB | optimizer state MB "
        "| total per rank MB (vs DDP) | expected MB (vs DDP) | peak RSS of a rank MB | median step ms (vs DDP) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *verdicts,
        "- Per parameter, DDP holds 4 + 4 + 8 bytes (fp32 parameter, gradient, AdamW's two moments) in both "
        "precisions: ember's bf16-mixed under DDP is autocast over fp32 parameters. DeepSpeed's bf16 mode holds "
        "bf16 parameters and gradients and an fp32 master copy. At the step every ZeRO stage holds only its "
        "partition of the gradients, the fp32 master copy and the moments; ZeRO-3 partitions the parameters "
        "too. (ZeRO-1 holds full gradients during backward and frees them once reduced, ZeRO-2 frees them "
        "bucket by bucket: a count at the step does not see that difference.) On 2 ranks ZeRO-3 holds "
        "(2 + 2 + 4 + 8) / 2 = 8 bytes per parameter in bf16-mixed, half of DDP's 16: the budget applies to "
        "that row.",
        f"- **fp32: ZeRO-3 holds {fp32} of DDP's state, not half: (4 + 4 + 4 + 8) / 2 = 10 of 16 bytes per "
        "parameter.** DeepSpeed 0.19.8 keeps its fp32 master partition as a second copy of the fp32 parameter "
        "partition: `_create_fp32_partitions` (stage3.py) means to reuse the partition when it is already fp32 "
        "on the optimizer's device, but compares a `torch.device` with a string (`tensor.device == \"cpu\"`, "
        "always False, on CUDA too), so it clones. The copy is DeepSpeed's, not ember's; ZeRO-1/2 keep a "
        "separate fp32 master copy in every precision by design.",
        f"- ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` (100k elements: biases, norms) "
        f"whole on every rank beside their partition ({whole / 1e6:.3f}M elements here). DeepSpeed's "
        "communication buckets (sized by `reduce_bucket_size`, not by the model) and DDP's gradient buckets "
        "are not counted.",
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
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; ddp always runs")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true", help=argparse.SUPPRESS)
    run_main(parser, "zero_memory", STRATEGIES, worker, report,
             quick={"layers": 1, "width": 48, "heads": 2, "chars": 20_000, "steps": 2, "reps": 1})  # fmt: skip


if __name__ == "__main__":
    main()
