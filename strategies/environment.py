"""Process environment detection: the one module of ember that reads environment variables.

Everything else receives plain values from here. Three sources are understood:

- a plain process (``python script.py``): rank 0 of 1;
- torchrun / torchelastic / ``ember launch`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ...);
- SLURM (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ...) when ``srun`` started the tasks.

A restarted process learns it from ``TORCHELASTIC_RESTART_COUNT`` (torchrun restarted the group,
``ember launch --max-restarts``) and ``SLURM_RESTART_COUNT`` (SLURM requeued the job): their sum is
:attr:`ProcessEnvironment.restart_count`, which turns on the Trainer's automatic resume.

``ember launch`` also passes the user's ``--strategy``/``--precision`` to the script through
``EMBER_STRATEGY`` / ``EMBER_PRECISION``; :func:`launch_defaults` reads them. :func:`running_in_ci`
reads ``CI`` for the callbacks that draw to the terminal. :func:`shared_random_seed` reads (and sets)
``EMBER_GLOBAL_SEED``, the random seed of a ``TrainerCLI`` run, which the processes it starts inherit.
:func:`deepspeed_config_path` reads ``PL_DEEPSPEED_CONFIG_PATH``, Lightning's variable naming the
DeepSpeed configuration file of a ``DeepSpeedStrategy`` given none.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import NamedTuple

__all__ = [
    "ProcessEnvironment",
    "deepspeed_config_path",
    "default_cublas_workspace",
    "detect_environment",
    "ensure_local_rank",
    "find_free_port",
    "launch_defaults",
    "preemption_agree_seconds",
    "process_rank",
    "running_in_ci",
    "scoped_variables",
    "shared_random_seed",
    "usable_cpus",
    "xla_cpu_devices",
]

_DEFAULT_MASTER_ADDR = "127.0.0.1"
#: Lightning's variable naming a DeepSpeed configuration file (read by :func:`deepspeed_config_path`).
DEEPSPEED_CONFIG_VARIABLE = "PL_DEEPSPEED_CONFIG_PATH"
#: Seconds between two pre-emption agreements of several processes (trainer/preemption.py).
PREEMPTION_AGREE_VARIABLE = "EMBER_PREEMPTION_AGREE_SECONDS"


class ProcessEnvironment(NamedTuple):
    """Where this process sits in the job. ``source`` is ``"single"``, ``"torchelastic"`` or ``"slurm"``.

    Immutable; ``env._replace(rank=1)`` makes a changed copy. (A named tuple: a frozen dataclass's
    generated methods would cost every run ~2 ms of start-up.)"""

    source: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = _DEFAULT_MASTER_ADDR
    master_port: int | None = None
    restart_count: int = (
        0  # times the job's processes were restarted (torchelastic restarts + SLURM requeues)
    )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def launched_externally(self) -> bool:
        """True when a launcher (torchrun, srun, ember launch) already started every process."""
        return self.source != "single"

    def to_env(self) -> dict[str, str]:
        """The torchrun-style variables that describe this environment (for child processes)."""
        env = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
        }
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
        return env


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is required here but is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``node[001-004,007],gpu2`` -> ``node001``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        return _DEFAULT_MASTER_ADDR
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_environment(environ: Mapping[str, str] | None = None) -> ProcessEnvironment:
    """Read the process environment (``os.environ`` unless given)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int(env, "WORLD_SIZE")
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
        rank = _int(env, "RANK")
        port = env.get("MASTER_PORT")
        return ProcessEnvironment(
            source="torchelastic",
            rank=rank,
            local_rank=_int(env, "LOCAL_RANK", rank % max(local_world_size, 1)),
            world_size=world_size,
            local_world_size=local_world_size,
            node_rank=_int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", _DEFAULT_MASTER_ADDR),
            master_port=int(port) if port else None,
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0) + _int(env, "SLURM_RESTART_COUNT", 0),
        )
    # srun starts one task per process; an interactive `salloc` shell (job name "bash") is not a job step.
    if (
        "SLURM_NTASKS" in env
        and "SLURM_PROCID" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    ):
        world_size = _int(env, "SLURM_NTASKS")
        job_id = _int(env, "SLURM_JOB_ID", 0)
        return ProcessEnvironment(
            source="slurm",
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world_size,
            local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", world_size)
            if env.get("SLURM_NTASKS_PER_NODE", "").isdigit()
            else max(world_size // max(_int(env, "SLURM_NNODES", 1), 1), 1),
            node_rank=_int(env, "SLURM_NODEID", 0),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "")),
            # Same port on every task of the job, different across jobs sharing a node.
            master_port=_int(env, "MASTER_PORT", 15000 + job_id % 20000),
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        )
    # A plain process can still be a requeued SLURM job's batch script.
    return ProcessEnvironment(source="single", restart_count=_int(env, "SLURM_RESTART_COUNT", 0))


def launch_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Accelerator defaults that ``ember launch`` passed down (``strategy``, ``precision``)."""
    env = os.environ if environ is None else environ
    defaults = {}
    for key in ("strategy", "precision", "accelerator"):
        value = env.get(f"EMBER_{key.upper()}")
        if value:
            defaults[key] = value
    return defaults


def shared_random_seed(environ: MutableMapping[str, str] | None = None) -> int:
    """A random seed every process of the run agrees on: the one the process that started this one
    drew (``EMBER_GLOBAL_SEED``), else a new one, exported for the processes this one starts (the
    Trainer's launcher passes its environment on). Processes that a launcher started side by side
    (torchrun, ``ember launch``) each draw their own unless the variable is set for them."""
    env = os.environ if environ is None else environ
    value = env.get("EMBER_GLOBAL_SEED", "")
    if value.isdigit():
        return int(value) % 2**32
    seed = random.SystemRandom().randrange(2**32)
    env["EMBER_GLOBAL_SEED"] = str(seed)
    return seed


def deepspeed_config_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The DeepSpeed configuration (JSON) file that ``PL_DEEPSPEED_CONFIG_PATH`` names, or None when it
    is not set. As in Lightning, a ``DeepSpeedStrategy`` given no ``config`` loads it."""
    env = os.environ if environ is None else environ
    return env.get(DEEPSPEED_CONFIG_VARIABLE)


def preemption_agree_seconds(default: float, environ: Mapping[str, str] | None = None) -> float:
    """Seconds between two pre-emption agreements of a fit's processes
    (``EMBER_PREEMPTION_AGREE_SECONDS``, ``default`` when unset; 0: at every step boundary)."""
    env = os.environ if environ is None else environ
    value = env.get(PREEMPTION_AGREE_VARIABLE, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # (NaN too)
        raise ValueError(
            f"{PREEMPTION_AGREE_VARIABLE}={value!r} must be a number of seconds >= 0 (0: agree at every step boundary)"
        )
    return seconds


def default_cublas_workspace(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it is set: what deterministic cuBLAS needs
    (read when cuBLAS starts)."""
    env = os.environ if environ is None else environ
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as its launcher set it (``RANK``; 0 outside a launcher)."""
    return _int(os.environ if environ is None else environ, "RANK", 0)


def xla_cpu_devices(environ: Mapping[str, str] | None = None) -> int:
    """The virtual devices torch_xla's CPU runtime makes (``CPU_NUM_DEVICES``, 1 when unset)."""
    return _int(os.environ if environ is None else environ, "CPU_NUM_DEVICES", 1)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def running_in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True when the ``CI`` variable says so (GitHub Actions, GitLab, Buildkite... set ``CI=true``).

    Used to pick plain log lines over live terminal widgets, whose redraws make CI logs unreadable.
    """
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def may_be_terminal() -> bool:
    """False when standard output is certainly not a terminal (a file, a pipe, a CI log): then rich's
    modules (~30 ms to import) are not needed to decide, and plain text is printed. True leaves the
    decision to ``rich.console.Console().is_terminal``: a TTY, a notebook, ``FORCE_TERMINAL`` or
    ``TTY_COMPATIBLE`` set."""
    if "FORCE_TERMINAL" in os.environ or "TTY_COMPATIBLE" in os.environ or "ipykernel" in sys.modules:
        return True
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def ensure_local_rank(local_rank: int) -> None:
    """Set ``LOCAL_RANK`` where no launcher did (a plain ``python train.py``): DeepSpeed's engine reads it."""
    os.environ.setdefault("LOCAL_RANK", str(local_rank))


def find_free_port() -> int:
    """A TCP port on loopback that is free right now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def scoped_variables(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a ``with`` block, then put back what was there
    (``notebook_launcher`` running its function in this process)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
