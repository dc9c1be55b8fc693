"""Start N real processes for a test (gloo, torchrun-style environment) and report each rank's failure.

    def _worker(tmp: str) -> dict:          # module-level function in a test file
        accelerator = Accelerator()         # reads RANK / WORLD_SIZE / MASTER_* set here
        ...
        return {"loss": 1.0}                # JSON-serialisable; collected per rank

    results = run_processes(_worker, str(tmp_path), nprocs=2)

Each rank runs in an interpreter forked from one that has torch and ember imported (warm_python.py),
as ``python -c`` would: it loads the test file by path and calls the function.
A failure raises with every failing rank's exit code and the end of its output (its traceback);
a hang is killed after ``timeout`` seconds and reported with the ranks still running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import warm_python

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
PYTHON = sys.executable
# What a launcher or `ember launch` sets; a test process starts without them.
RANK_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "TORCHELASTIC_RUN_ID", "EMBER_STRATEGY", "EMBER_PRECISION", "EMBER_ACCELERATOR",
    "EMBER_GLOBAL_SEED",  # (TrainerCLI's seed_everything: true, for the processes it starts)
)  # fmt: skip

# A helper module directly under tests/ is imported by its own name, so that what it defines pickles
# (a DataLoader worker started by a forkserver imports it again); a test file loads from its path.
_BOOTSTRAP = """
import importlib, importlib.util, json, sys
sys.path.insert(0, {tests!r})
if {helper!r}:
    module = importlib.import_module({helper!r})
else:
    spec = importlib.util.spec_from_file_location("_ember_test_module", {path!r})
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
result = getattr(module, {name!r})(*json.loads({args!r}))
with open({out!r}, "w") as f:
    json.dump(result, f)
"""


def _bootstrap(fn: Callable[..., Any], args: tuple[Any, ...], out: Path) -> str:
    """The code a fresh interpreter runs to call ``fn(*args)`` and write its result to ``out``."""
    path = Path(fn.__code__.co_filename)
    helper = path.stem if path.parent == TESTS_DIR else ""
    return _BOOTSTRAP.format(
        tests=str(TESTS_DIR),
        path=str(path),
        helper=helper,
        name=fn.__name__,
        args=json.dumps(args),
        out=str(out),
    )


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` loaded by path, as module ``bench_<name>`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment for child processes: no inherited rank variables, one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_processes(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int = 2,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    nodes: int = 1,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` ranks; return each rank's return value, in rank order.

    ``nodes > 1`` describes the ranks as ``nodes`` nodes of ``nprocs // nodes`` processes (all on
    this machine, as a launcher on each node would number them).
    """
    per_node = nprocs // nodes
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ember-ranks-"))
    procs, logs = [], []
    for rank in range(nprocs):
        out = workdir / f"result{rank}.json"
        log = open(workdir / f"rank{rank}.log", "w+b")
        rank_env = base_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank % per_node),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(per_node),
            GROUP_RANK=str(rank // per_node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **(env or {}),
        )
        code = _bootstrap(fn, args, out)
        procs.append(
            warm_python.start(
                [PYTHON, "-c", code], env=rank_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        )
        logs.append(log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(
            p.poll() not in (None, 0) for p in procs
        ):  # one rank failed: give the others a moment, then stop
            time.sleep(2)
            break
        time.sleep(0.1)
    hung = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    failures = []
    for rank, (p, log) in enumerate(zip(procs, logs, strict=False)):
        log.seek(0)
        text = log.read().decode(errors="replace")
        log.close()
        if p.returncode != 0:
            state = (
                "did not finish in time (killed)"
                if rank in hung and not any(q.returncode not in (0, -9) for q in procs)
                else f"exited with code {p.returncode}"
            )
            failures.append(f"--- rank {rank} {state} ---\n{text[-6000:]}")
    if failures:
        raise AssertionError(f"{len(failures)} of {nprocs} ranks failed:\n" + "\n".join(failures))
    return [json.loads((workdir / f"result{rank}.json").read_text()) for rank in range(nprocs)]


def run_command(
    cmd: list[str], timeout: float = 180.0, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with a clean environment; never leaves it running after ``timeout``."""
    return subprocess.run(
        cmd, env=env or base_env(), cwd=str(cwd or REPO), capture_output=True, text=True, timeout=timeout
    )


def run_in_subprocess(
    fn: Callable[..., Any], *args: Any, timeout: float = 180.0, env: dict[str, str] | None = None
) -> Any:
    """Run ``fn(*args)`` in one fresh interpreter started like a plain ``python`` script (no rank
    variables) and return its result. For runtimes fixed at first use (XLA)."""
    workdir = Path(tempfile.mkdtemp(prefix="ember-fresh-"))
    out = workdir / "result.json"
    code = _bootstrap(fn, args, out)
    # A hang shows where it waits: every thread's stack, printed just before the timeout kills it.
    after = max(timeout - 10, timeout * 0.9)
    code = f"import faulthandler; faulthandler.dump_traceback_later({after}, exit=True)\n{code}"
    done = run_command([PYTHON, "-c", code], timeout=timeout, env=base_env(**(env or {})))
    if done.returncode != 0:
        raise AssertionError(
            f"{fn.__name__} exited with code {done.returncode}:\n{(done.stdout + done.stderr)[-6000:]}"
        )
    return json.loads(out.read_text())
