"""The ``ember`` command line: ``ember launch`` runs a script on N processes (and N nodes);
``ember consolidate`` turns a checkpoint's (sharded) weights into one safetensors file;
``ember convert-lightning`` turns a Lightning ``.ckpt`` into an ember checkpoint directory;
``ember env`` prints the versions and devices a bug report needs; ``ember config`` writes the
launch options into a YAML file that ``ember launch --config-file`` reads; ``ember plot`` draws the
metrics of CSV-logged runs into a PNG. Each command's work lives in its own private module.

``ember launch`` is a thin layer over ``torch.distributed.run`` (torchrun): it validates the
arguments before anything starts, passes ``--strategy``/``--precision`` to the script's
Accelerator/Trainer through ``EMBER_STRATEGY``/``EMBER_PRECISION``, and hands the rest to torchrun.
It also takes torchrun's and ``accelerate launch``'s usual flags (``ember/_launch_flags.py``), refuses
the others with the ember equivalent (``ember/_launch_refusals.py``), reads Accelerate's config file
(``ember/_accelerate_config.py``), and exits with a failed rank's exit code.

Examples::

    ember launch --nproc-per-node 2 train.py --lr 1e-3
    # two machines (or two shells on one machine, over loopback):
    ember launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 4 train.py
    ember launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 4 train.py
    ember config --nproc-per-node 2 --strategy fsdp && ember launch --config-file ember_config.yaml train.py
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ember._launch_config import (
    DEFAULT_CONFIG_FILE,
    LaunchConfigError,
    add_launch_options,
    defaults,
    resolve_options,
)
from ember._launch_flags import (
    add_runner_options,
    check_runner_options,
    check_script,
    runner_argv,
    runner_env,
)
from ember._launch_refusals import refusal

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: a PyTorch training library")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser(
        "launch",
        help="run a training script on several processes / nodes (wraps torchrun)",
        description="Run SCRIPT on --nproc-per-node processes per node, --nnodes nodes (torch.distributed.run).",
    )
    add_launch_options(launch)
    launch.add_argument(
        "--config-file",
        "--config_file",  # 🤗 Accelerate's spelling, as --num_processes and --mixed_precision are
        metavar="FILE",
        default=None,
        help="read the options above from this YAML file (see `ember config`); options given here override it",
    )
    launch.add_argument(
        "-m", "--module", action="store_true", help="SCRIPT is a module name (like python -m)"
    )
    add_runner_options(launch)
    launch.add_argument("script", help="the training script (or module, with -m)")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    consolidate = commands.add_parser(
        "consolidate",
        help="write the full weights of a checkpoint (sharded or not) into one safetensors file",
        description="Read the model weights of the save_state checkpoint CKPT_DIR (any strategy, any world "
        "size) and write them, unsharded, into the safetensors file OUT, one tensor in memory at a time.",
    )
    consolidate.add_argument(
        "checkpoint", metavar="CKPT_DIR", help="a directory written by save_state / the Trainer"
    )
    consolidate.add_argument("out", metavar="OUT", help="the safetensors file to write")
    consolidate.add_argument(
        "--model", type=int, default=0, help="which prepared model, in preparation order (default 0)"
    )
    consolidate.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert = commands.add_parser(
        "convert-lightning",
        help="turn a Lightning .ckpt file into an ember checkpoint directory (read without unpickling code)",
        description="Read the Lightning checkpoint CKPT with torch.load(weights_only=True) and write it as the "
        "ember Trainer checkpoint OUT_DIR (new or empty): load_from_checkpoint rebuilds the module from it, and "
        "fit(ckpt_path=OUT_DIR) resumes a fit with one optimizer.",
    )
    convert.add_argument("ckpt", metavar="CKPT", help="the Lightning .ckpt file")
    convert.add_argument(
        "out_dir", metavar="OUT_DIR", help="the checkpoint directory to write (new or empty)"
    )
    env = commands.add_parser(
        "env",
        help="print versions, devices and the process environment (for bug reports)",
        description="Print the versions of ember, Python, torch and the optional packages, the devices, and "
        "the process environment ember detects, with the environment variables that shape a run.",
    )
    env.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    config = commands.add_parser(
        "config",
        help="write the options of `ember launch` into a YAML file for --config-file",
        description="Write a launch config file: the options given here, the others at their defaults. "
        "With no option and a terminal on stdin, ask for each option instead.",
    )
    add_launch_options(config)
    config.add_argument(
        "--output",
        metavar="FILE",
        default=DEFAULT_CONFIG_FILE,
        help=f"file to write (default {DEFAULT_CONFIG_FILE})",
    )
    config.add_argument("--force", action="store_true", help="replace FILE if it exists")
    config.add_argument(
        "--interactive",
        action="store_true",
        help="ask for each option even when stdin is not a terminal (answers are read line by line)",
    )
    plot = commands.add_parser(
        "plot",
        help="draw the metrics of runs logged by CSVLogger into one PNG (needs matplotlib)",
        description="Read metrics.csv from each RUN_DIR (a run folder, or a folder above several) and draw "
        "one subplot per metric, x = step, one line per run.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder or a folder above runs")
    plot.add_argument("--out", default="curves.png", help="the PNG file to write (default curves.png)")
    plot.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    return parser


def _consolidate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember._weights import consolidate_checkpoint
    from ember.strategies.checkpoint_io import CheckpointError, read_manifest
    from ember.strategies.checkpoint_swap import locate_checkpoint

    out = Path(args.out)
    if out.is_dir():
        parser.error(f"OUT {args.out!r} is a directory; give the path of the safetensors file to write")
    if out.exists() and not args.force:
        parser.error(f"OUT {args.out!r} exists; pass --force to replace it")
    checkpoint = locate_checkpoint(Path(args.checkpoint))
    try:
        manifest = read_manifest(checkpoint)
    except CheckpointError as err:
        parser.error(f"CKPT_DIR: {err}")
    models = manifest["counts"]["models"]
    if not 0 <= args.model < models:
        parser.error(f"--model {args.model} is not in [0, {models}): the checkpoint holds {models} model(s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = consolidate_checkpoint(checkpoint, out, manifest, args.model)
    print(f"wrote {len(names)} tensors to {out}")
    return 0


def _read_answer(prompt: str) -> str:
    answer = input(prompt)
    if not sys.stdin.isatty():  # answers piped in: echo them, so the transcript reads like a terminal
        print(answer)
    return answer


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember._launch_config import ask, validate_options, write_config

    out = Path(args.output)

    def check_output() -> None:
        if out.is_dir():
            parser.error(f"--output {args.output!r} is a directory; give the path of the YAML file to write")
        if out.exists() and not args.force:
            parser.error(f"--output {args.output!r} exists; pass --force to replace it")

    check_output()  # before the prompts (no answers typed for nothing), and again after them
    given = {key: getattr(args, key) for key in defaults() if getattr(args, key) is not None}
    try:
        values = validate_options({**defaults(), **given})
        if args.interactive or (not given and sys.stdin.isatty()):
            values = ask(values, read=_read_answer)
    except LaunchConfigError as err:
        parser.error(str(err))
    except EOFError:
        parser.error("stdin ended before every option was answered; nothing was written")
    check_output()
    write_config(out, values)
    print(f"wrote {out}: " + ", ".join(f"{key}={value!r}" for key, value in values.items()))
    print(f"run it with: ember launch --config-file {out} SCRIPT [ARGS ...]")
    return 0


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that can fail happens here, before a process starts.

    Each option comes from the command line if given, else from ``--config-file``, else its default.
    """
    total = getattr(args, "num_processes", None)
    if total is not None and args.nproc_per_node is not None:
        parser.error("pass --nproc-per-node (per node) or --num_processes (in all), not both")
    if getattr(args, "multi_gpu", False):
        if args.accelerator not in (None, "cuda", "gpu"):
            parser.error(f"--multi_gpu runs on GPUs, but --accelerator {args.accelerator} was given")
        args.accelerator = "cuda"
    check_runner_options(args, parser.error)
    source = "--num_processes"
    if total is None and args.nproc_per_node is None and args.config_file is not None:
        from ember._accelerate_config import processes_in_all

        total, source = processes_in_all(args.config_file), "the config file's num_processes"
    try:
        options = resolve_options({key: getattr(args, key) for key in defaults()}, args.config_file)
        for key, value in options.items():
            setattr(args, key, value)
    except LaunchConfigError as err:
        parser.error(str(err))
    if total is not None:  # 🤗 Accelerate counts processes over all machines, however many they end up
        if total % args.nnodes:
            parser.error(f"{source} {total} does not divide evenly over --nnodes {args.nnodes}")
        args.nproc_per_node = total // args.nnodes
    if args.standalone and args.nnodes != 1:
        parser.error(
            f"--standalone runs one node, not --nnodes {args.nnodes}: give --master-addr and --master-port"
        )
    check_script(args, parser.error)


def torchrun_args(args: argparse.Namespace) -> list[str]:
    """The torchrun command line equivalent to a parsed ``ember launch`` (defaults for options not given)."""
    args = argparse.Namespace(
        **{**vars(args), **{k: v for k, v in defaults().items() if getattr(args, k) is None}}
    )
    argv = [
        f"--nproc-per-node={args.nproc_per_node}",
        f"--nnodes={args.nnodes}",
        f"--max-restarts={args.max_restarts}",
        *runner_argv(args, args.nnodes),
    ]
    return [*argv, args.script, *args.script_args]


def exit_status(exitcode: int) -> int:
    """``ember launch``'s exit status for a failed rank's exit code: the same code (75, a pre-emption, lets
    the job script requeue), or 128 + N for a rank killed by signal N, as a shell reports it."""
    if exitcode > 0:
        return exitcode
    return 128 - exitcode if exitcode < 0 else 1


def launch(args: argparse.Namespace) -> int:
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for key in ("strategy", "precision", "accelerator"):
        value = getattr(args, key)
        if value is not None:
            os.environ[f"EMBER_{key.upper()}"] = value  # read by the script's Accelerator (environment.py)
    os.environ.update(runner_env(args))  # torchrun passes its environment on to the processes
    try:
        torchrun_main(torchrun_args(args))
    except ChildFailedError as failed:  # (the rank's traceback is printed; its summary, as torchrun's, here)
        print(failed.format_msg(), file=sys.stderr, flush=True)
        _, first = failed.get_first_failure()
        return exit_status(first.exitcode)
    except SignalException as stopped:  # SIGTERM/SIGINT/...: torchrun has already stopped every rank
        name = signal.Signals(stopped.sigval).name
        print(f"ember launch: stopped by {name}; every process was stopped", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # an option of 🤗 Accelerate or torchrun that ember does not take says what to use instead
        parser.error(refusal(args.command, extras))
    if args.command == "launch":
        _validate(parser, args)
        return launch(args)
    if args.command == "consolidate":
        return _consolidate(parser, args)
    if args.command == "convert-lightning":
        from ember.trainer.lightning_ckpt import LightningCheckpointError, convert_lightning

        try:
            out, why = convert_lightning(args.ckpt, args.out_dir)
        except (LightningCheckpointError, FileExistsError) as err:
            parser.error(str(err))
        print(f"wrote {out}: " + (f"weights only, {why}" if why else "resumable with fit(ckpt_path=...)"))
        return 0
    if args.command == "env":
        import json

        from ember._env import collect, render_text

        report = collect(os.environ)
        print(json.dumps(report, indent=2) if args.json else render_text(report))
        return 0
    if args.command == "config":
        return _config(parser, args)
    if args.command == "plot":
        from ember._plot import PlotError, plot_runs

        try:
            plot_runs(args.run_dirs, args.metrics, args.out)
        except PlotError as err:
            parser.error(str(err))
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first


if __name__ == "__main__":
    sys.exit(main())
