"""No hangs: a rank that raises ends every rank quickly, naming itself and its exception; the collective
watchdog turns a collective that some rank never reaches into stack dumps, a report naming that rank,
and a non-zero exit. Real processes: ``python script.py`` with ``devices=2`` (ember's launcher), gloo."""

from __future__ import annotations

import re
import time
from pathlib import Path

from dist_helpers import PYTHON, base_env, run_command

# One script, several ways to go wrong on one rank at step STEP. It prints when it goes wrong.
SCRIPT = """
import sys, time
import torch
from torch import nn
from ember import Accelerator

mode, bad_rank, step_at = sys.argv[1], int(sys.argv[2]), 2
accelerator = Accelerator(devices=2, strategy="ddp", collective_timeout=3.0)
rank = accelerator.process_index
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
for step in range(4):
    bad = rank == bad_rank and step == step_at
    if bad:
        print(f"WENT WRONG AT {time.time()}", flush=True)
    if bad and mode == "raise":
        raise RuntimeError(f"boom at step {step}")
    if mode == "skip":  # the last reduce is skipped on the bad rank, which then waits in a barrier
        if not bad:
            accelerator.reduce(torch.ones(1))
        continue
    loss = model(torch.randn(8, 4)).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.reduce(loss.detach(), "mean")
if mode == "skip" and rank == bad_rank:
    time.sleep(2.0)  # so that the other rank, waiting in its reduce since before, times out first
accelerator.wait_for_everyone()
print(f"rank {rank} finished", flush=True)
"""

# The Trainer passes collective_timeout through; rank 1 stops answering inside training_step.
TRAINER_SCRIPT = """
import time
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ember import Trainer, TrainModule

class Sleepy(TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and self.global_step == 2:
            print(f"WENT WRONG AT {time.time()}", flush=True)
            time.sleep(10**6)
        return F.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
trainer = Trainer(devices=2, strategy="ddp", collective_timeout=3, max_epochs=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Sleepy(), DataLoader(data, batch_size=4))
"""


def _run(tmp_path: Path, script: str, *args: str, launch: bool = False) -> tuple[int, str, float]:
    """Exit code, output of every rank, and seconds from the moment it went wrong to the end of the job.
    ``launch``: started by ``ember launch`` (torchrun) instead of ember's own launcher."""
    path = tmp_path / "job.py"
    path.write_text(script)
    launcher = [PYTHON, "-m", "ember", "launch", "--nproc-per-node", "2"] if launch else [PYTHON]
    done = run_command([*launcher, str(path), *args], timeout=90, env=base_env(), cwd=tmp_path)
    ended = time.time()
    output = done.stdout + done.stderr
    went_wrong = re.search(r"WENT WRONG AT ([\d.]+)", output)
    assert went_wrong is not None, output[-6000:]
    return done.returncode, output, ended - float(went_wrong.group(1))


def test_a_rank_that_raises_ends_the_job_naming_itself(tmp_path: Path) -> None:
    code, output, seconds = _run(tmp_path, SCRIPT, "raise", "1")
    assert code != 0
    assert seconds < 20, output[-6000:]
    assert "[rank1]: RuntimeError: boom at step 2" in output  # its own traceback
    # ... and the other rank, waiting for it in a collective, says who failed and why.
    assert "ember: rank 0: rank 1 failed with RuntimeError: boom at step 2" in output, output[-6000:]
    assert "rank 0 finished" not in output


def test_under_ember_launch_too(tmp_path: Path) -> None:
    # torchrun's agent stops the group once a worker exits; the waiting rank names the cause first.
    code, output, seconds = _run(tmp_path, SCRIPT, "raise", "1", launch=True)
    assert code != 0
    assert seconds < 20, output[-6000:]
    assert "[rank1]: RuntimeError: boom at step 2" in output
    assert "ember: rank 0: rank 1 failed with RuntimeError: boom at step 2" in output, output[-6000:]


def test_rank_zero_raising_stops_the_other_ranks(tmp_path: Path) -> None:
    code, output, seconds = _run(tmp_path, SCRIPT, "raise", "0")
    assert code != 0
    assert seconds < 20, output[-6000:]
    assert "[rank0]: RuntimeError: boom at step 2" in output
    assert "ember: rank 0 failed with RuntimeError: boom at step 2" in output  # the launcher's summary
    assert "rank 1 finished" not in output


def test_watchdog_names_the_rank_that_skipped_a_collective(tmp_path: Path) -> None:
    code, output, seconds = _run(tmp_path, SCRIPT, "skip", "1")
    assert code == 1, output[-6000:]
    assert 3 <= seconds < 25, output[-6000:]
    # (reduce's first collective: its shape check, an all-gather)
    report = re.search(r"ember: collective 'all_gather' #\d+ timed out after \d+ s on rank 0; (.*)", output)
    assert report is not None, output[-6000:]
    assert report.group(1) == "ranks that did not reach it: [1]"
    assert re.search(
        r"rank 1: waiting in 'barrier\(wait_for_everyone\)' #\d+ for [\d.]+ s: a different", output
    )
    for rank in (0, 1):  # every rank's Python stacks, with the frame it is stuck in
        assert f"Python stacks of rank {rank}" in output
    assert "in reduce" in output  # rank 0 in its reduce
    assert "in wait_for_everyone" in output  # rank 1 in its barrier


def test_watchdog_names_a_rank_that_stopped_answering(tmp_path: Path) -> None:
    code, output, seconds = _run(tmp_path, TRAINER_SCRIPT)
    assert code == 1, output[-6000:]
    assert 3 <= seconds < 25, output[-6000:]
    assert re.search(r"ember: collective '\w+' #\d+ timed out after \d+ s on rank 0; ranks that did not "
                     r"reach it: \[1\]", output), output[-6000:]  # fmt: skip
    assert re.search(r"rank 1: not in a collective; it left '\w+' #\d+ [\d.]+ s ago", output)
    assert "Python stacks of rank 1" in output
    assert "in training_step" in output  # where rank 1 sleeps


def test_stopping_the_watchdog_waits_for_its_threads() -> None:
    # A watchdog thread left inside a store call while Python finalizes aborts the process
    # ("terminate called without an active exception") after a successful run: stop() joins them.
    from torch.distributed import HashStore

    from ember._watchdog import CollectiveWatchdog

    watchdog = CollectiveWatchdog(rank=0, world_size=2, timeout=60.0, store=HashStore(), namespace="stop")
    watchdog.start()
    threads = list(watchdog._threads)
    assert len(threads) == 2 and all(t.is_alive() for t in threads)
    time.sleep(0.6)  # the store thread has polled the store at least once
    watchdog.stop()
    assert not any(t.is_alive() for t in threads)


EXIT_SCRIPT = """
import atexit, sys, threading
import torch
from torch import nn
from ember import Accelerator

# Registered first, so it runs after ember's exit handlers: which threads are still alive then.
atexit.register(lambda: print("ALIVE AT EXIT", sorted(t.name for t in threading.enumerate()
                                                      if t.name.startswith("ember-watchdog")), flush=True))
first = Accelerator(devices=2, strategy="ddp", collective_timeout=60.0)  # makes the group
second = Accelerator(strategy="ddp", devices=2, collective_timeout=60.0)  # joins it: a second watchdog
model, optimizer = second.prepare(nn.Linear(4, 1), torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1))
second.backward(model(torch.ones(2, 4)).sum())
print("WENT WRONG AT 0", flush=True)  # (what _run looks for; nothing goes wrong here)
"""


def test_every_watchdog_is_stopped_before_the_process_exits(tmp_path: Path) -> None:
    # Each Accelerator on a group starts a watchdog; the one of a strategy that joined an existing
    # group has no teardown of its own: it is stopped at exit too, before Python finalizes.
    code, output, _ = _run(tmp_path, EXIT_SCRIPT)
    assert code == 0, output[-6000:]
    assert output.count("ALIVE AT EXIT []") == 2, output[-6000:]
