"""DataLoader workers started by a forkserver end with the process that iterates the prepared loader."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

from dist_helpers import PYTHON, REPO, base_env

from ember._workers import _ExitWithIterator, worker_init

_SCRIPT = """
import os, signal, sys
import torch
from torch.utils.data import DataLoader, Dataset
from ember import Accelerator

class Pids(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        open(os.path.join(sys.argv[1], "%d-%d" % (os.getpid(), os.getppid())), "w").close()
        return torch.tensor(float(i))

if __name__ == "__main__":  # the forkserver imports this script again
    loader = DataLoader(Pids(), batch_size=2, num_workers=2, multiprocessing_context="forkserver")
    batches = iter(Accelerator().prepare(loader))
    while len(os.listdir(sys.argv[1])) < 2:  # both workers have fetched
        next(batches)
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs: as when the OOM killer ends a rank
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_forkserver_workers_and_server_end_when_the_iterating_process_is_killed(tmp_path: Path) -> None:
    script, seen = tmp_path / "train.py", tmp_path / "seen"
    script.write_text(_SCRIPT)
    seen.mkdir()
    # Output to a file: a worker left running would hold a pipe open, and reading it would never end.
    with open(tmp_path / "log", "wb") as log:
        code = subprocess.run(
            [PYTHON, str(script), str(seen)],
            env=base_env(),
            cwd=str(REPO),
            stdout=log,
            stderr=log,
            timeout=120,
        ).returncode
    assert code == -signal.SIGKILL, (tmp_path / "log").read_text()
    workers = {int(name.split("-")[0]) for name in os.listdir(seen)}
    servers = {int(name.split("-")[1]) for name in os.listdir(seen)}
    assert len(workers) == 2 and len(servers) == 1
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and any(map(_running, workers | servers)):
            time.sleep(0.1)
        assert not [pid for pid in workers | servers if _running(pid)], "left running after the rank died"
    finally:
        for pid in workers | servers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_only_forkserver_loaders_get_the_watch() -> None:
    def user(worker_id: int) -> None:
        pass

    assert worker_init(user, 0, None) is user
    assert worker_init(user, 2, multiprocessing.get_context("spawn")) is user
    wrapped = worker_init(user, 2, multiprocessing.get_context("forkserver"))
    assert isinstance(wrapped, _ExitWithIterator) and wrapped.fn is user
    assert worker_init(wrapped, 2, multiprocessing.get_context("forkserver")) is wrapped
