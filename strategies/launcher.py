"""Start the ranks a plain ``python script.py`` run is missing.

When a script asks for ``devices=N`` without a launcher (torchrun, ``ember launch``, srun), rank 0 is
the current process and ranks 1..N-1 are new processes running the same command line with
torchrun-style variables set. If any rank fails, the others are stopped, so nothing is left running:
a child that exits with an error ends the job at once; when rank 0 itself fails, the children get
``_STOP_GRACE_S`` seconds to notice (their collectives fail as soon as rank 0's process group is gone),
then are killed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from ember.strategies.environment import ProcessEnvironment, find_free_port

__all__ = ["SubprocessScriptLauncher"]

_STOP_GRACE_S = 5.0


def _command_line() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):  # started as `python -m package.module`
        name = spec.name.removesuffix(".__main__")
        return [sys.executable, "-m", name, *sys.argv[1:]]
    if not sys.argv or sys.argv[0] in ("", "-c"):
        raise RuntimeError(
            "devices > 1 from an interactive session or `python -c` cannot re-run the program for the "
            "other ranks; put the code in a script and use `ember launch --nproc-per-node N script.py`"
        )
    return [sys.executable, *sys.argv]


def _main_failure() -> BaseException | None:
    """The exception that is ending this (rank 0's) program, once Python has printed it."""
    failure = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return failure if isinstance(failure, BaseException) else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SubprocessScriptLauncher:
    """Re-runs the current command for ranks ``1..num_processes-1``; this process becomes rank 0."""

    def __init__(self, num_processes: int) -> None:
        if num_processes < 2:
            raise ValueError(f"num_processes={num_processes}: the subprocess launcher needs at least 2")
        self.num_processes = num_processes
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._failed: dict[int, int] = {}  # rank -> exit code of the children that failed

    def launch(self) -> ProcessEnvironment:
        command = _command_line()
        port = find_free_port()

        def env_for(rank: int) -> ProcessEnvironment:
            return ProcessEnvironment(
                source="torchelastic",
                rank=rank,
                local_rank=rank,
                world_size=self.num_processes,
                local_world_size=self.num_processes,
                master_port=port,
            )

        for rank in range(1, self.num_processes):
            child_env = {**os.environ, **env_for(rank).to_env()}
            self._children[rank] = subprocess.Popen(
                command, env=child_env, preexec_fn=_die_with_parent if sys.platform == "linux" else None
            )
        threading.Thread(target=self._watch, name="ember-rank-watch", daemon=True).start()
        atexit.register(self._wait)
        # This process is rank 0 from now on: a second Accelerator (or Trainer) must join, not launch again.
        os.environ.update(env_for(0).to_env())
        return env_for(0)

    def _watch(self) -> None:
        """Stop the whole job as soon as one child rank fails, instead of hanging in a collective."""
        while self._children:
            for rank, child in list(self._children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self._children[rank]
                if code != 0:
                    self._failed[rank] = code
                if code != 0 and _main_failure() is None:  # else rank 0 failed too: _wait stops the job
                    print(
                        f"ember: rank {rank} exited with code {code}; stopping the job",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._kill_all()
                    sys.stdout.flush()
                    os._exit(code if code > 0 else 1)
            time.sleep(0.2)

    def _kill_all(self) -> None:
        for child in list(self._children.values()):  # the watch thread may be removing entries
            child.kill()
        self._children.clear()

    def _wait(self) -> None:
        failure = _main_failure()
        if failure is None:  # rank 0 finished: the others finish their own work
            for child in list(self._children.values()):
                child.wait()
            return
        failed = {**self._failed, **{r: c.returncode for r, c in list(self._children.items()) if c.poll()}}
        also = "".join(f"; rank {r} had exited with code {code}" for r, code in sorted(failed.items()))
        notes = "".join(f" ({note})" for note in getattr(failure, "__notes__", []))
        print(
            f"ember: rank 0 failed with {type(failure).__name__}: {failure}{notes}{also}; stopping the other ranks",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + _STOP_GRACE_S
        for child in list(self._children.values()):
            try:
                child.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                pass
        self._kill_all()
