"""Pre-emption signals and automatic restart: a stopped or failed fit continues bit for bit.

Every fit here is ``trainer_workers.fit_preemptible``: 3 epochs, accumulation 2, a checkpoint every
3 optimizer steps. On one process: 10 batches and 5 steps per epoch (15 steps); on two: 5 batches
and 3 steps per epoch and rank (9 steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import PYTHON, REPO, TESTS_DIR, base_env, run_command, run_in_subprocess, run_processes
from trainer_workers import fit, fit_preemptible, preemption_agreement

from ember.strategies.checkpoint_io import read_manifest, read_tree
from ember.strategies.environment import PREEMPTION_AGREE_VARIABLE, detect_environment
from ember.trainer.config import TrainerConfig
from ember.trainer.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionGuard,
    _SignalCatcher,
)


def _same_run(result: dict, reference: dict) -> None:
    assert result["rows"] == reference["rows"] and len(reference["rows"]) > 10  # metrics.csv, bit for bit
    assert result["params"] == reference["params"]  # the final weights, bit for bit
    assert result["step"] == reference["step"]


def _loop_of(checkpoint: Path) -> dict:
    read_manifest(checkpoint)  # complete, every file matches its checksum
    return read_tree(checkpoint, "trainer_state")["loop"]


@contextmanager
def _one_thread() -> Iterator[None]:
    """As in the test's subprocesses (OMP_NUM_THREADS=1), so that in-process fits compute the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted fit on one process."""
    with _one_thread():
        return fit_preemptible(str(tmp_path_factory.mktemp("full1")))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_processes(fit_preemptible, str(tmp_path_factory.mktemp("full2")), nprocs=2)


# -- signals -------------------------------------------------------------------------------------------
def test_an_external_sigterm_saves_last_exits_75_and_the_resume_is_exact(
    tmp_path: Path, one_process: dict
) -> None:
    root, handshake = tmp_path / "run", tmp_path / "handshake"
    # The child stops in on_train_batch_end of step 7 (mid-epoch 1) until we have signalled it. It does
    # not catch Preempted: the exit status is the process's own.
    code = (
        "import sys, ember\n"  # ember first: tests/ember (a test folder) would shadow it
        f"sys.path.append({str(TESTS_DIR)!r})\n"
        "from trainer_workers import fit_preemptible\n"
        f"fit_preemptible({str(root)!r}, signal_at=7, handshake={str(handshake)!r}, catch=False)\n"
        "print('fit returned')\n"
    )
    child = subprocess.Popen(
        [PYTHON, "-c", code], env=base_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{handshake}.ready").exists():
            assert child.poll() is None, child.communicate()[0].decode()
            assert time.monotonic() < deadline, "the child never reached step 7"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGTERM)  # from outside, while the child is in the middle of its work
        Path(f"{handshake}.go").touch()
        output = child.communicate(timeout=120)[0].decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == PREEMPTED_EXIT_CODE == 75, output
    assert "pre-empted by SIGTERM at step 7" in output and "fit returned" not in output
    last = root / "checkpoints" / "last"
    assert _loop_of(last) == {
        "epoch": 1, "global_step": 7, "batch_idx": 4, "total_batch_idx": 14, "stepped_batches": 7,
        "train_done": False, "val_done": False, "epoch_done": False,
    }  # fmt: skip
    resumed = run_in_subprocess(fit_preemptible, str(root), "last")
    _same_run(resumed, one_process)


_EVERY_BOUNDARY = {PREEMPTION_AGREE_VARIABLE: "0"}


def test_processes_agree_about_every_half_second_and_stop_at_the_same_boundary() -> None:
    # 10 ms per boundary: an agreement every 0.1 s is every ~10th boundary, on both ranks alike.
    first, second = run_processes(preemption_agreement, 50, "0.1", nprocs=2)
    assert first == second, (first, second)
    assert 5 <= first["interval"] <= 12
    assert 50 < first["boundary"] <= 50 + 2 * first["interval"] + 1
    assert first["boundary"] % first["interval"] == 0


def test_a_bad_agreement_interval_is_refused() -> None:
    os.environ[PREEMPTION_AGREE_VARIABLE] = "-1"
    try:
        with pytest.raises(
            ValueError, match=r"EMBER_PREEMPTION_AGREE_SECONDS='-1' must be a number of seconds >= 0"
        ):
            with PreemptionGuard().during_fit():
                pass
    finally:
        del os.environ[PREEMPTION_AGREE_VARIABLE]


def test_only_rank_1_gets_sigusr1_and_both_ranks_stop_at_the_same_step(
    tmp_path: Path, two_ranks: list[dict]
) -> None:
    root = str(tmp_path / "run")
    # Rank 1 signals itself in on_train_batch_end of step 4; rank 0 never gets a signal. The ranks
    # agree at every boundary here (EMBER_PREEMPTION_AGREE_SECONDS=0, for a predictable step), learn
    # of it one boundary later (each agreement reads the all-reduce the previous one started, so
    # that none waits for the others), and stop together there.
    stopped = run_processes(
        fit_preemptible, root, "", None, 4, int(signal.SIGUSR1), 1, nprocs=2, env=_EVERY_BOUNDARY
    )
    last = str(tmp_path / "run" / "checkpoints" / "last")
    for rank in range(2):
        assert stopped[rank] == {"preempted_at": 5, "signal": "SIGUSR1", "code": 75, "checkpoint": last}
    assert read_manifest(Path(last))["world_size"] == 2
    assert _loop_of(Path(last))["global_step"] == 5
    resumed = run_processes(fit_preemptible, root, "last", nprocs=2)
    _same_run(resumed[0], two_ranks[0])
    assert resumed[1]["params"] == two_ranks[1]["params"] == two_ranks[0]["params"]


_PREEMPTED_SCRIPT = """
import signal, sys
import ember  # first: tests/ember (a test folder) would shadow the package
sys.path.append({tests!r})
from trainer_workers import fit_preemptible

if __name__ == "__main__":  # the loader's workers start from a forkserver, which imports this script
    fit_preemptible(sys.argv[1], signal_at=4, signum=signal.SIGUSR1, signal_rank=1, catch=False)
"""


def test_ember_launch_exits_75_when_its_workers_were_preempted(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_PREEMPTED_SCRIPT.format(tests=str(TESTS_DIR)))
    command = [PYTHON, "-m", "ember", "launch", "--nproc-per-node", "2", str(script), str(tmp_path / "run")]
    done = run_command(command, timeout=240, env=base_env(**_EVERY_BOUNDARY))
    log = done.stdout + done.stderr
    assert done.returncode == PREEMPTED_EXIT_CODE, log[-6000:]  # for the job script to requeue
    assert "pre-empted by SIGUSR1 at step 5" in log  # signalled at step 4, agreed one boundary later
    assert _loop_of(tmp_path / "run" / "checkpoints" / "last")["global_step"] == 5


_RESTART_SCRIPT = """
import json, os, sys
import ember  # first: tests/ember (a test folder) would shadow the package
sys.path.append({tests!r})
from trainer_workers import fit_preemptible

if __name__ == "__main__":  # the loader's workers start from a forkserver, which imports this script
    root, marker, out = sys.argv[1:4]
    result = fit_preemptible(root, die_at=7, die_rank=1, marker=marker)  # no ckpt_path
    with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(result, f)
"""


# -- automatic restart ------------------------------------------------------------------------------
def test_ember_launch_restarts_the_group_and_the_fit_resumes_by_itself(
    tmp_path: Path, two_ranks: list[dict]
) -> None:
    script = tmp_path / "train.py"
    script.write_text(_RESTART_SCRIPT.format(tests=str(TESTS_DIR)))
    root, marker, out = tmp_path / "run", tmp_path / "died", tmp_path / "out"
    out.mkdir()
    command = [PYTHON, "-m", "ember", "launch", "--nproc-per-node", "2", "--max-restarts", "1", str(script)]
    done = run_command([*command, str(root), str(marker), str(out)], timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert marker.exists()  # rank 1 died once, at step 7 (checkpoints at steps 3 and 6 existed)
    assert "ember: resuming automatically from" in log and "epoch=1-step=6" in log, log[-6000:]
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    _same_run(results[0], two_ranks[0])
    assert results[1]["params"] == two_ranks[1]["params"]


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, one_process: dict
) -> None:
    root = tmp_path / "run"
    with _one_thread():
        # The fit of fit_preemptible, with an exception after step 7; checkpoints at steps 3 and 6.
        assert fit(str(root), "crash", crash_at=7) == {"crashed": 7}
    newest = root / "checkpoints" / "epoch=1-step=6"
    weights = newest / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    # auto_resume=True: a fit without ckpt_path resumes even in a process that was not restarted.
    with _one_thread():
        resumed = fit_preemptible(str(root), auto_resume=True)
    _same_run(resumed, one_process)
    skipped = [w for w in resumed["warnings"] if "automatic resume skips" in w]
    assert len(skipped) == 1 and "epoch=1-step=6" in skipped[0] and "truncated" in skipped[0]


def test_restart_count_comes_from_torchelastic_and_slurm() -> None:
    assert detect_environment({}).restart_count == 0
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert detect_environment(torchrun).restart_count == 2
    assert detect_environment({**torchrun, "SLURM_RESTART_COUNT": "1"}).restart_count == 3  # requeued too
    srun = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    assert detect_environment(srun).restart_count == 1
    assert detect_environment({"SLURM_RESTART_COUNT": "4"}).restart_count == 4  # a requeued batch script


def test_auto_resume_is_none_true_or_false() -> None:
    with pytest.raises(ValueError, match="auto_resume=1. Valid choices: None, True, False"):
        TrainerConfig(auto_resume=1)  # type: ignore[arg-type]


def test_auto_resume_true_needs_a_model_checkpoint(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader
    from trainer_workers import Net, dataset

    from ember import Trainer

    trainer = Trainer(max_epochs=1, enable_checkpointing=False, auto_resume=True, default_root_dir=str(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, logger=False)  # fmt: skip
    with pytest.raises(ValueError, match="auto_resume=True looks for checkpoints in the ModelCheckpoint"):
        trainer.fit(Net(), DataLoader(dataset(), batch_size=4))


@pytest.fixture
def usr1_handler() -> Iterator[list[int]]:
    """A Python handler for SIGUSR1, as a script may have installed before the fit."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR1, previous)


def test_the_handlers_live_only_inside_and_chain_to_the_previous_python_handler(
    usr1_handler: list[int],
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    catcher = _SignalCatcher()
    with catcher:
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == catcher._handle
        signal.raise_signal(signal.SIGUSR1)  # Python runs the handler before the next line
        assert catcher.received == signal.SIGUSR1
        assert usr1_handler == [signal.SIGUSR1]  # chained: the script's own handler ran too
    assert {s: signal.getsignal(s) for s in before} == before
    assert usr1_handler == [signal.SIGUSR1]  # not run a second time on the way out


def test_an_ignored_signal_stays_ignored_and_other_threads_install_nothing() -> None:
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with _SignalCatcher() as catcher:
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == catcher._handle
    finally:
        signal.signal(signal.SIGUSR1, previous)
    seen: list[Any] = []

    def in_a_thread() -> None:
        with _SignalCatcher():  # signal.signal would raise ValueError outside the main thread
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_a_signal_the_fit_did_not_act_on_is_delivered_again_when_it_ends() -> None:
    # After the last step boundary nothing saves any more: when the handlers are restored, the
    # signal is raised again, so its default action (terminate) happens as without the fit. Blocked
    # here, so that the test can see it pending instead of dying of it.
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        with _SignalCatcher() as catcher:
            signal.raise_signal(signal.SIGUSR1)
            assert catcher.received == signal.SIGUSR1  # recorded, and the process lives on
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        assert signal.SIGUSR1 in signal.sigpending()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # discards the pending signal
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, previous)
    with _SignalCatcher() as catcher:  # acted on (Preempted raised): nothing is delivered again
        signal.raise_signal(signal.SIGUSR1)
        catcher.acted = True
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        assert signal.SIGUSR1 not in signal.sigpending()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
