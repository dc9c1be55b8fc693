"""The contenders of the overhead benchmarks (``step_overhead.py``, ``scaling.py``): the same model,
data and optimizer trained by a hand-written loop, ember and, when installed, Lightning and Accelerate.

Every contender trains ``warmup + steps + 1`` batches of one epoch. The model is wrapped in a
:class:`Clock` that reads the time when the forward of batch ``warmup`` starts and when the forward
of batch ``warmup + steps`` starts: the steady-state time of ``steps`` whole steps (data loading,
forward, backward, optimizer, and everything a framework does between two forwards: hooks, logging,
progress bar), measured the same way for everyone. Set-up and tear-down are outside the window.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import alternate, child_env
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent

CONTENDERS = ("hand", "accelerator", "trainer", "lightning", "lightning_barebones", "fabric", "accelerate")
# The Python package each contender needs beyond ember; missing: the contender is reported as skipped.
NEEDS = {"lightning": "lightning", "lightning_barebones": "lightning", "fabric": "lightning",
         "accelerate": "accelerate"}  # fmt: skip

# The budgets of the step-overhead measures (step_overhead.py, instructions.py): ratio to the hand loop.
BUDGETS = {"accelerator": 1.01, "trainer": 1.02}
# The rival each ember contender must stay below: the Lightning API it corresponds to.
RIVALS = {"accelerator": "fabric", "trainer": "lightning"}
LABELS = {
    "hand": "hand-written loop", "accelerator": "ember Accelerator", "trainer": "ember Trainer (defaults)",
    "lightning": "Lightning Trainer (defaults)", "lightning_barebones": "Lightning Trainer (barebones=True)",
    "fabric": "Lightning Fabric", "accelerate": "Accelerate",
}  # fmt: skip
DESCRIPTIONS = {
    "mlp": "MLP 128-256-256-10, batch 64",
    "gpt": "example GPT (2 layers, width 64, 4 heads), batch 16 x 32 tokens",
}


def missing_package(contender: str) -> str | None:
    package = NEEDS.get(contender)
    return package if package is not None and importlib.util.find_spec(package) is None else None


@dataclasses.dataclass(kw_only=True, slots=True)
class Run:
    """One training run: what to train, how long, where; ``metrics``/``callbacks`` for scaling."""

    case: str  # "mlp" or "gpt" (or "tiny" for scaling)
    warmup: int
    steps: int
    device: str = "cpu"
    root: str = "."  # log and checkpoint directory of the trainers
    metrics: int = 1  # values logged per training step (trainers)
    callbacks: int = 0  # extra no-op callbacks (ember Trainer)

    @property
    def batches(self) -> int:
        return self.warmup + self.steps + 1


class Clock(nn.Module):
    """Wraps the model; times the forwards of batch ``start`` to batch ``stop`` (one per step).

    With a ``pacer`` (:class:`HandLoop`, the hand-written loop on its own copy of the model and
    data), each forward before ``stop`` first runs one step of the pacer, timed on its own: the
    contender's steps and the hand-written loop's alternate step by step, so that a change in the
    machine's speed (other load, frequency) hits both alike, and the contender's time is the window's
    less the pacer's steps in it (see ``measure``)."""

    def __init__(
        self, net: nn.Module, start: int, stop: int, sync: bool, pacer: HandLoop | None = None
    ) -> None:
        super().__init__()
        self.net, self.start, self.stop, self.sync = net, start, stop, sync
        self.calls, self.started, self.stopped = 0, 0.0, 0.0
        self.cpu_started = self.cpu_stopped = 0.0
        self.pacer = pacer
        self.paced = 0  # the pacer's steps inside the window, and their time
        self.pace_s = self.pace_cpu_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pacer is not None and self.calls < self.stop:
            self._pace()
        if self.calls == self.start or self.calls == self.stop:
            if self.sync:  # the device's queued work belongs to the steps before
                torch.cuda.synchronize()
            now = time.perf_counter(), time.process_time()
            if self.calls == self.start:
                self.started, self.cpu_started = now
            else:
                self.stopped, self.cpu_stopped = now
        self.calls += 1
        return self.net(x)

    def _pace(self) -> None:
        assert self.pacer is not None
        if self.sync:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        self.pacer.step()
        if self.sync:
            torch.cuda.synchronize()
        if self.start < self.calls:  # inside the window (the pacer runs before the start stamp)
            self.paced += 1
            self.pace_s += time.perf_counter() - wall
            self.pace_cpu_s += time.process_time() - cpu

    def window(self) -> tuple[float, float]:
        """The timing window's (wall-clock, CPU) seconds, pacer steps included; an error if it never ended."""
        if self.calls <= self.stop:
            raise RuntimeError(
                f"the timing window ended early: {self.calls} forwards, expected > {self.stop}"
            )
        return self.stopped - self.started, self.cpu_stopped - self.cpu_started


# -- the cases ---------------------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class Case:
    net: nn.Module
    dataset: TensorDataset
    batch_size: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flat_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def build_case(run: Run, world_size: int) -> Case:
    """The model (seeded) and enough data for ``run.batches`` batches on each of ``world_size`` ranks."""
    torch.manual_seed(0)
    if run.case == "gpt":
        sys.path.insert(0, str(REPO / "examples"))
        from gpt_fsdp import GPT  # the example's model, in a small configuration

        vocab, block, batch = 96, 32, 16
        gpt = GPT(vocab=vocab, block_size=block, layers=2, width=64, heads=4, lr=1e-3)
        gpt.configure_model()
        samples = run.batches * batch * world_size
        ids = torch.randint(vocab, (samples, block + 1))
        return Case(gpt, TensorDataset(ids[:, :-1], ids[:, 1:]), batch, _flat_cross_entropy)
    if run.case == "mlp":
        sizes, batch = (128, 256, 256, 10), 64
    elif run.case == "tiny":
        sizes, batch = (32, 32, 10), 16
    else:
        raise ValueError(f"unknown case {run.case!r}")
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    samples = run.batches * batch * world_size
    x, y = torch.randn(samples, sizes[0]), torch.randint(sizes[-1], (samples,))
    return Case(net, TensorDataset(x, y), batch, F.cross_entropy)


def _optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _loader(case: Case, sampler: Any = None) -> DataLoader[Any]:
    return DataLoader(case.dataset, batch_size=case.batch_size, shuffle=sampler is None, sampler=sampler)


def _world() -> tuple[int, int]:
    """(rank, world size) of this process, as a launcher (torchrun, ``ember launch``) set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# -- hand-written loops ------------------------------------------------------------------------------
class HandLoop:
    """The hand-written loop, one step at a time: the contender ``hand`` runs it to the end of its
    data; as a :class:`Clock`'s pacer it takes one step beside each step of another contender."""

    def __init__(self, run: Run, case: Case, model: nn.Module) -> None:
        rank, world = _world()
        self.device = (
            torch.device(run.device, int(os.environ.get("LOCAL_RANK", "0"))) if run.device == "cuda" else None
        )
        if self.device is not None:
            model = model.to(self.device)
            torch.cuda.set_device(self.device)
        self.owns_group = world > 1 and not torch.distributed.is_initialized()
        if self.owns_group:
            _init_process_group(run)
        sampler = None
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
            sampler = torch.utils.data.DistributedSampler(case.dataset, world, rank, shuffle=True)
        self.model, self.loss = model, case.loss
        self.autocast: Callable[[], AbstractContextManager[Any]] = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device is not None else nullcontext
        )
        self.optimizer = _optimizer(model.parameters())
        self.batches = iter(_loader(case, sampler))

    def step(self) -> bool:
        """One training step on the next batch; False (and no step) when the data is used up."""
        batch = next(self.batches, None)
        if batch is None:
            return False
        x, y = batch
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return True

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def _hand(run: Run, case: Case, clock: Clock) -> None:
    loop = HandLoop(run, case, clock)
    while loop.step():
        pass
    loop.close()


def _init_process_group(run: Run) -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if run.device == "cuda" else None
    torch.distributed.init_process_group("nccl" if device is not None else "gloo", device_id=device)


def _ember_accelerator(run: Run, case: Case, clock: Clock) -> None:
    from ember import Accelerator

    accelerator = Accelerator(precision="bf16-mixed" if run.device == "cuda" else None)
    model, optimizer, loader = accelerator.prepare(clock, _optimizer(clock.parameters()), _loader(case))
    for x, y in loader:
        loss = case.loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.end_training()


def _fabric(run: Run, case: Case, clock: Clock) -> None:
    from lightning.fabric import Fabric

    _, world = _world()
    fabric = Fabric(accelerator=run.device, devices=world, strategy="ddp" if world > 1 else "auto",
                    precision="bf16-mixed" if run.device == "cuda" else "32-true")  # fmt: skip
    fabric.launch()
    model, optimizer = fabric.setup(clock, _optimizer(clock.parameters()))
    for x, y in fabric.setup_dataloaders(_loader(case)):
        loss = case.loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def _accelerate(run: Run, case: Case, clock: Clock) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=run.device == "cpu", mixed_precision="bf16" if run.device == "cuda" else "no"
    )
    model, optimizer, loader = accelerator.prepare(clock, _optimizer(clock.parameters()), _loader(case))
    for x, y in loader:
        loss = case.loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    # No ``end_training()``: it would destroy the process group, which belongs to the measuring
    # process (``measure_rounds``) and serves its next runs.


# -- Trainers --------------------------------------------------------------------------------------
def _training_step(module: Any, batch: Any, run: Run, case: Case, log: bool) -> torch.Tensor:
    x, y = batch
    loss = case.loss(module.model(x), y)
    if log:
        module.log("loss", loss, prog_bar=True)
        for i in range(1, run.metrics):  # scaling: more values per step, each from the step's work
            module.log(f"metric_{i}", loss)
    return loss


def _ember_trainer(run: Run, case: Case, clock: Clock) -> None:
    from ember import Trainer, TrainModule
    from ember.callbacks import Callback

    class Module(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = clock

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return _training_step(self, batch, run, case, log=run.metrics > 0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(self.parameters())

    class NoOp(Callback):  # scaling: defines every per-batch hook, so that the Trainer calls them all
        @property
        def state_key(self) -> str:
            return f"NoOp{id(self)}"

        def on_train_batch_start(self, *args: Any) -> None:
            pass

        def on_before_backward(self, *args: Any) -> None:
            pass

        def on_after_backward(self, *args: Any) -> None:
            pass

        def on_before_optimizer_step(self, *args: Any) -> None:
            pass

        def on_train_batch_end(self, *args: Any) -> None:
            pass

    trainer = Trainer(max_steps=run.batches, default_root_dir=run.root, callbacks=[NoOp() for _ in range(run.callbacks)],
                      precision="bf16-mixed" if run.device == "cuda" else None)  # fmt: skip
    trainer.fit(Module(), _loader(case))
    trainer.accelerator.end_training()


def _lightning(run: Run, case: Case, clock: Clock, barebones: bool = False) -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = clock

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return _training_step(self, batch, run, case, log=not barebones)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(self.parameters())

    _, world = _world()
    trainer = L.Trainer(max_steps=run.batches, default_root_dir=run.root, accelerator=run.device, devices=world,
                        strategy="ddp" if world > 1 else "auto", barebones=barebones,
                        precision="bf16-mixed" if run.device == "cuda" else "32-true")  # fmt: skip
    trainer.fit(Module(), _loader(case))


def _lightning_barebones(run: Run, case: Case, clock: Clock) -> None:
    _lightning(run, case, clock, barebones=True)


_TRAIN: dict[str, Callable[[Run, Case, Clock], None]] = {
    "hand": _hand, "accelerator": _ember_accelerator, "trainer": _ember_trainer, "lightning": _lightning,
    "lightning_barebones": _lightning_barebones, "fabric": _fabric, "accelerate": _accelerate,
}  # fmt: skip


def measure(contender: str, run: Run, paced: bool = False) -> dict[str, float]:
    """Train with ``contender`` in this process (one rank of it); its seconds per step (``step_s``
    wall-clock, ``cpu_s`` CPU time).

    ``paced``: the hand-written loop, on its own copy of the model and data, takes a step before
    each of the contender's (:class:`Clock`); ``step_s``/``cpu_s`` are then the contender's own
    steps (the window less the pacer's steps in it) and ``pace_s``/``pace_cpu_s`` the pacer's, in
    the same window. Their quotient is immune to the machine changing speed during the run."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the frameworks' advice (num_workers ...) would flood the log
    _, world = _world()
    pacer = HandLoop(run, pacer_case := build_case(run, world), pacer_case.net) if paced else None
    case = build_case(run, world)
    clock = Clock(case.net, run.warmup, run.warmup + run.steps, sync=run.device == "cuda", pacer=pacer)
    _TRAIN[contender](run, case, clock)
    wall, cpu = clock.window()
    measured = {"step_s": (wall - clock.pace_s) / run.steps, "cpu_s": (cpu - clock.pace_cpu_s) / run.steps}
    if pacer is not None:
        pacer.close()
        measured.update(pace_s=clock.pace_s / clock.paced, pace_cpu_s=clock.pace_cpu_s / clock.paced)
    return measured


def measure_rounds(
    contenders: Sequence[str], run: Run, rounds: int, paced: bool = False
) -> dict[str, list[dict[str, float]]]:
    """Train each of ``contenders`` ``rounds`` times in this process, alternating: every round runs
    each once, one contender later than the round before (A B C, B C A, C A B ...). The runs of a
    round are neighbours in time and share the process (its memory layout, its core, the machine's
    load then), so the ratio of two of them is a paired measure: far steadier than the ratio of two
    processes, which can differ by several percent running the same program. With several
    processes (a launcher's ranks), every rank runs the same sequence on one process group, made
    here and shared by every run. ``paced``: each run has a pacer (see :func:`measure`)."""
    _, world = _world()
    if world > 1 and not torch.distributed.is_initialized():
        _init_process_group(run)
    runs = itertools.count()  # each run its own logs and checkpoints
    results = alternate(
        contenders,
        rounds,
        lambda c: measure(c, dataclasses.replace(run, root=f"{run.root}/{c}-{next(runs)}"), paced),
        warm=False,
    )
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


# -- the parent's side: fresh processes, alternating repetitions -----------------------------------------
# What a launcher sets; a contender's single process must start without them.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT", "TORCHELASTIC_RUN_ID", "EMBER_STRATEGY", "EMBER_PRECISION")  # fmt: skip


def spawn(script: str, argv: list[str], nproc: int, timeout: float = 900) -> list[Any]:
    """Run ``script --out FILE --root DIR *argv`` in fresh processes (``ember launch`` for several);
    each rank writes its measurements to ``FILE.<rank>``. Output goes to a log shown on failure.

    A run that fails is started once more; a second failure raises. A process that aborts at exit
    with "terminate called without an active exception" (a live C++ thread of a gloo group
    destroyed with the interpreter; seen now and then in the hand-written DDP loop and in rivals)
    after every rank wrote its measurements is not a failed measurement: its results are used,
    with a note on stderr."""
    try:
        return _spawn_once(script, argv, nproc, timeout)
    except RuntimeError as error:
        print(f"{error}\n(starting that run once more)", file=sys.stderr, flush=True)
        return _spawn_once(script, argv, nproc, timeout)


def _spawn_once(script: str, argv: list[str], nproc: int, timeout: float) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result"
        command = [script, *argv, "--out", str(out), "--root", tmp]
        if nproc > 1:
            command = ["-m", "ember", "launch", "--nproc-per-node", str(nproc), *command]
        env = {k: v for k, v in child_env(PYTHONWARNINGS="ignore").items() if k not in _RANK_VARIABLES}
        log = Path(tmp) / "output.log"
        with open(log, "wb") as sink:
            done = subprocess.run([sys.executable, *command], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)  # fmt: skip
        written = all(Path(f"{out}.{rank}").exists() for rank in range(nproc))
        if done.returncode != 0:
            text = log.read_text(errors="replace")
            if not (written and _ABORT_AT_EXIT in text):
                raise RuntimeError(
                    f"{' '.join(command)} failed with status {done.returncode}:\n{text[-4000:]}"
                )
            print(f"note: {' '.join(command)} aborted at exit ({_ABORT_AT_EXIT!r}) after writing its "
                  "measurements; they are used", file=sys.stderr, flush=True)  # fmt: skip
        return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(nproc)]


_ABORT_AT_EXIT = "terminate called without an active exception"


def write_result(out: str, result: Any) -> None:
    """A worker rank's measurements, for :func:`spawn`."""
    rank, _ = _world()
    Path(f"{out}.{rank}").write_text(json.dumps(result))
