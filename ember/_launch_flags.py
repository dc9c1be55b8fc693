"""The options of ``ember launch`` that are not keys of its config file.

- torchrun's options that ember passes through unchanged (``--rdzv-backend c10d``, ``--log-dir``,
  ``--tee``, ``--local-ranks-filter``, ``--no-python``, ...), checked here before torchrun starts;
- 🤗 Accelerate's launch flags that have an ember equivalent (``--cpu``, ``--use_fsdp``,
  ``--use_deepspeed --zero_stage 3``, ``--num_cpu_threads_per_process``, ``--debug``): each becomes
  that equivalent (a ``--strategy`` name, ``--accelerator cpu``, an environment variable);
- the flags of either tool that ember does not take are refused in ``ember/_launch_refusals.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable

__all__ = [
    "SHARDING",
    "add_runner_options",
    "check_runner_options",
    "check_script",
    "deepspeed_strategy",
    "fsdp_strategy",
    "runner_argv",
    "runner_env",
]

_STD = "0 (none), 1 (stdout), 2 (stderr), 3 (both), or LOCAL_RANK:N pairs such as 0:3,1:2"


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number of seconds") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} {text!r} must be a number of seconds > 0")
        return value

    return parse


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer (expected >= 1)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {value} must be >= 1")
        return value

    return parse


def _std_spec(flag: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        from torch.distributed.elastic.multiprocessing import Std

        try:
            Std.from_str(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not valid; expected {_STD}") from None
        return text

    return parse


def _ranks(text: str) -> str:
    parts = text.split(",")
    if not all(part.strip().isdecimal() for part in parts):
        raise argparse.ArgumentTypeError(
            f"--local-ranks-filter {text!r} is not valid; expected local ranks separated by commas, such as 0 or 0,1"
        )
    return text


def _choice(flag: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in (c.lower() for c in choices):
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r} is not a valid choice. Valid choices: "
                + ", ".join(repr(c) for c in choices)
            )
        return text.lower()

    return parse


SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "1", "2", "4")
_SHARDING_STRATEGY = {"full_shard": "fsdp", "1": "fsdp", "shard_grad_op": "fsdp_shard_grad_op", "2": "fsdp_shard_grad_op",
                      "hybrid_shard": "fsdp_hybrid", "4": "fsdp_hybrid"}  # fmt: skip


def add_runner_options(parser: argparse.ArgumentParser) -> None:
    """torchrun's pass-through options and 🤗 Accelerate's mapped flags (launch only, not in the file)."""
    run = parser.add_argument_group("torchrun's options, passed on to it")
    run.add_argument(
        "--standalone",
        action="store_true",
        help="one node on a free local port (what ember does by itself for one node without --master-port)",
    )
    run.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        default=None,
        type=_choice("--rdzv-backend", ("static", "c10d")),
        metavar="{static,c10d}",
        help="static (default): node ranks from --node-rank; c10d: the nodes meet at --rdzv-endpoint "
        "and get their ranks from it (the same command on every node)",
    )
    run.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="rdzv_endpoint",
        default=None,
        metavar="HOST:PORT",
        help="where the nodes meet (static: the same as --master-addr HOST --master-port PORT)",
    )
    run.add_argument(
        "--rdzv-id",
        "--rdzv_id",
        dest="rdzv_id",
        default=None,
        metavar="ID",
        help="job id shared by the nodes of one c10d rendezvous (default: ember)",
    )
    run.add_argument(
        "--monitor-interval",
        "--monitor_interval",
        dest="monitor_interval",
        default=None,
        type=_positive_float("--monitor-interval"),
        metavar="SECONDS",
        help="how often torchrun checks its workers",
    )
    run.add_argument(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        default=None,
        metavar="DIR",
        help="write each rank's output under DIR (with --redirects or --tee)",
    )
    run.add_argument(
        "-r",
        "--redirects",
        default=None,
        type=_std_spec("--redirects"),
        metavar="SPEC",
        help=f"send ranks' output to files in --log-dir only: {_STD}",
    )
    run.add_argument(
        "-t",
        "--tee",
        default=None,
        type=_std_spec("--tee"),
        metavar="SPEC",
        help="as --redirects, and to the console too",
    )
    run.add_argument(
        "--local-ranks-filter",
        "--local_ranks_filter",
        dest="local_ranks_filter",
        default=None,
        type=_ranks,
        metavar="RANKS",
        help="show only these local ranks' output on the console, e.g. 0",
    )
    run.add_argument(
        "--no-python",
        "--no_python",
        dest="no_python",
        action="store_true",
        help="SCRIPT is an executable, run without python",
    )
    run.add_argument(
        "--run-path",
        "--run_path",
        dest="run_path",
        action="store_true",
        help="run SCRIPT with runpy.run_path in torchrun's worker process",
    )
    acc = parser.add_argument_group("🤗 Accelerate's launch flags, mapped to ember's")
    acc.add_argument("--cpu", action="store_true", help="= --accelerator cpu")
    acc.add_argument(
        "--num_cpu_threads_per_process",
        default=None,
        type=_positive_int("--num_cpu_threads_per_process"),
        metavar="N",
        help="OMP_NUM_THREADS of each process (torchrun's default: 1 with several processes)",
    )
    acc.add_argument(
        "--debug",
        action="store_true",
        help="TORCH_DISTRIBUTED_DEBUG=DETAIL: every collective is checked for matching shapes on all ranks",
    )
    acc.add_argument("--same_network", action="store_true", help="accepted; ember always uses --master-addr")
    acc.add_argument(
        "--use_deepspeed",
        action="store_true",
        help="= --strategy deepspeed_stage_N[_offload], from --zero_stage and --offload_*_device",
    )
    acc.add_argument(
        "--zero_stage",
        default=None,
        type=_choice("--zero_stage", ("1", "2", "3")),
        metavar="{1,2,3}",
        help="with --use_deepspeed (default 2)",
    )
    acc.add_argument(
        "--offload_optimizer_device",
        default=None,
        type=_choice("--offload_optimizer_device", ("none", "cpu")),
        metavar="{none,cpu}",
        help="with --use_deepspeed",
    )
    acc.add_argument(
        "--offload_param_device",
        default=None,
        type=_choice("--offload_param_device", ("none", "cpu")),
        metavar="{none,cpu}",
        help="with --use_deepspeed --zero_stage 3",
    )
    acc.add_argument(
        "--use_fsdp",
        action="store_true",
        help="= --strategy fsdp, fsdp_shard_grad_op, fsdp_hybrid or fsdp_offload, from the flags below",
    )
    acc.add_argument(
        "--fsdp_sharding_strategy",
        default=None,
        type=_choice("--fsdp_sharding_strategy", tuple(c.upper() for c in SHARDING)),
        metavar="{FULL_SHARD,SHARD_GRAD_OP,HYBRID_SHARD}",
        help="with --use_fsdp (default FULL_SHARD)",
    )
    acc.add_argument(
        "--fsdp_reshard_after_forward",
        default=None,
        type=_choice("--fsdp_reshard_after_forward", ("true", "false", *SHARDING)),
        metavar="{true,false}",
        help="with --use_fsdp: false = SHARD_GRAD_OP",
    )
    acc.add_argument("--fsdp_offload_params", default=None, type=_choice("--fsdp_offload_params", ("true", "false")),
                     metavar="{true,false}", help="with --use_fsdp: true = fsdp_offload")  # fmt: skip


def deepspeed_strategy(args: argparse.Namespace, error: Callable[[str], None]) -> str:
    stage = int(args.zero_stage or 2)
    optimizer, params = args.offload_optimizer_device or "none", args.offload_param_device or "none"
    if stage == 3 and optimizer != params:
        error(f"--offload_optimizer_device {optimizer} with --offload_param_device {params}: ember's "
              "deepspeed_stage_3_offload offloads both to the CPU; for one only, pass DeepSpeedStrategy"
              "(DeepSpeedConfig(...)) in the script")  # fmt: skip
    if stage < 3 and params != "none":
        error(
            f"--offload_param_device {params} needs --zero_stage 3 (ZeRO-{stage} keeps the parameters whole)"
        )
    if stage == 1 and optimizer != "none":
        error(
            "--offload_optimizer_device cpu needs --zero_stage 2 or 3 (ember has no deepspeed_stage_1_offload)"
        )
    return f"deepspeed_stage_{stage}" + ("_offload" if optimizer == "cpu" else "")


def fsdp_strategy(args: argparse.Namespace, error: Callable[[str], None]) -> str:
    sharding = args.fsdp_sharding_strategy
    if args.fsdp_reshard_after_forward is not None:
        reshard = {"true": "full_shard", "false": "shard_grad_op"}.get(args.fsdp_reshard_after_forward,
                                                                        args.fsdp_reshard_after_forward)  # fmt: skip
        if sharding is not None and _SHARDING_STRATEGY[sharding] != _SHARDING_STRATEGY[reshard]:
            error(f"--fsdp_reshard_after_forward {args.fsdp_reshard_after_forward} contradicts "
                  f"--fsdp_sharding_strategy {sharding}")  # fmt: skip
        sharding = reshard
    name = _SHARDING_STRATEGY[sharding or "full_shard"]
    if args.fsdp_offload_params == "true":
        if name != "fsdp":
            error(
                f"--fsdp_offload_params true works with FULL_SHARD only (ember's fsdp_offload), not {sharding}"
            )
        name = "fsdp_offload"
    return name


def check_runner_options(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """Check the options of this module and turn the mapped flags into ember's options (``args.strategy``,
    ``args.accelerator``, ``args.master_addr``...); runs before the launch-config options are resolved."""
    deepspeed = [
        f for f in ("zero_stage", "offload_optimizer_device", "offload_param_device") if getattr(args, f)
    ]
    fsdp = [
        f
        for f in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward", "fsdp_offload_params")
        if getattr(args, f)
    ]
    if deepspeed and not args.use_deepspeed:
        error(
            f"--{deepspeed[0]} configures DeepSpeed: add --use_deepspeed (or pass --strategy deepspeed_stage_N)"
        )
    if fsdp and not args.use_fsdp:
        error(f"--{fsdp[0]} configures FSDP: add --use_fsdp (or pass --strategy fsdp...)")
    if args.use_deepspeed and args.use_fsdp:
        error("pass --use_deepspeed or --use_fsdp, not both")
    mapped = (
        deepspeed_strategy(args, error)
        if args.use_deepspeed
        else fsdp_strategy(args, error)
        if args.use_fsdp
        else None
    )
    if mapped is not None:
        flag = "--use_deepspeed" if args.use_deepspeed else "--use_fsdp"
        if args.strategy is not None and args.strategy != mapped:
            error(f"{flag} means --strategy {mapped}, but --strategy {args.strategy} was given")
        args.strategy = mapped
    if args.cpu:
        if args.accelerator not in (None, "cpu"):
            error(f"--cpu runs on the CPU, but --accelerator {args.accelerator} was given")
        args.accelerator = "cpu"
    if args.rdzv_endpoint is not None:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
            error(f"--rdzv-endpoint {args.rdzv_endpoint!r} is not HOST:PORT with a port in [1, 65535]")
        for key, value in (("master_addr", host.strip("[]")), ("master_port", int(port))):
            if getattr(args, key) is not None:
                error(f"pass --rdzv-endpoint or --{key.replace('_', '-')}, not both")
            setattr(args, key, value)
    if args.rdzv_backend == "c10d":
        if args.node_rank is not None:
            error("--node-rank is assigned by the c10d rendezvous: leave it out with --rdzv-backend c10d")
        if args.rdzv_endpoint is None:
            error("--rdzv-backend c10d needs --rdzv-endpoint HOST:PORT, the same on every node")
    elif args.rdzv_id is not None:
        error("--rdzv-id names a c10d rendezvous: add --rdzv-backend c10d")
    if args.standalone and (args.master_port is not None or args.rdzv_backend == "c10d"):
        error(
            "--standalone picks a free local port: leave out --master-port, --rdzv-endpoint and --rdzv-backend"
        )
    if args.module and (args.no_python or args.run_path):
        error(
            f"-m runs a module with python: it cannot go with {'--no-python' if args.no_python else '--run-path'}"
        )
    if args.run_path:
        args.script = os.path.abspath(args.script)  # torchrun's --run-path wants an absolute path


def check_script(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    if args.module:
        return
    if args.no_python:
        if not os.path.isfile(args.script) and shutil.which(args.script) is None:
            error(f"script {args.script!r} is neither a file nor a command on PATH (--no-python)")
        return
    if not os.path.isfile(args.script):
        error(f"script {args.script!r} does not exist or is not a file")


def runner_argv(args: argparse.Namespace, nnodes: int) -> list[str]:
    """torchrun's arguments for the rendezvous and the pass-through options (not the process counts)."""
    if args.rdzv_backend == "c10d":
        argv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
                f"--rdzv-id={args.rdzv_id or 'ember'}"]  # fmt: skip
    elif nnodes == 1 and args.master_port is None:
        argv = ["--standalone"]
    else:  # static rendezvous: node 0's agent hosts the store at master_addr:master_port
        port = args.master_port if args.master_port is not None else 29500
        argv = [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}", f"--master-port={port}"]
    for key in ("monitor_interval", "log_dir", "redirects", "tee", "local_ranks_filter"):
        value = getattr(args, key, None)
        if value is not None:
            argv.append(f"--{key.replace('_', '-')}={value}")
    for key in ("module", "no_python", "run_path"):
        if getattr(args, key, False):
            argv.append(f"--{key.replace('_', '-')}")
    return argv


def runner_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment variables for the processes (the launcher's environment is passed on to them)."""
    env = {}
    if getattr(args, "num_cpu_threads_per_process", None) is not None:
        env["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)
    if getattr(args, "debug", False):
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    return env
