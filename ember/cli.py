"""The ``ember`` command line: ``ember launch`` runs a script on N processes (and N nodes);
``ember consolidate`` turns a checkpoint's (sharded) weights into one safetensors file.

``ember launch`` is a thin layer over ``torch.distributed.run`` (torchrun): it validates the
arguments before anything starts, passes ``--strategy``/``--precision`` to the script's
Accelerator/Trainer through ``EMBER_STRATEGY``/``EMBER_PRECISION``, and hands the rest to torchrun.

Examples::

    ember launch --nproc-per-node 2 train.py --lr 1e-3
    # two machines (or two shells on one machine, over loopback):
    ember launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 4 train.py
    ember launch --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 --nproc-per-node 4 train.py
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _positive(name: str) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} {value} must be >= 1")
        return value

    parse.__name__ = name
    return parse  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: a PyTorch training library")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser(
        "launch",
        help="run a training script on several processes / nodes (wraps torchrun)",
        description="Run SCRIPT on --nproc-per-node processes per node, --nnodes nodes (torch.distributed.run).",
    )
    launch.add_argument(
        "--nproc-per-node",
        type=_positive("--nproc-per-node"),
        default=1,
        help="processes per node (default 1)",
    )
    launch.add_argument("--nnodes", type=_positive("--nnodes"), default=1, help="number of nodes (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="rank of this node, 0..nnodes-1")
    launch.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    launch.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="port on node 0 (default: a free port on one node, 29500 on several)",
    )
    launch.add_argument(
        "--strategy", default=None, help="default strategy of the script's Accelerator/Trainer"
    )
    launch.add_argument(
        "--precision", default=None, help="default precision of the script's Accelerator/Trainer"
    )
    launch.add_argument("--accelerator", default=None, choices=["auto", "cpu", "cuda", "xla"], help="device type")
    launch.add_argument(
        "--max-restarts", type=int, default=0, help="restart the whole group up to K times on failure"
    )
    launch.add_argument(
        "-m", "--module", action="store_true", help="SCRIPT is a module name (like python -m)"
    )
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
    return parser


def _consolidate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember._checkpoint import consolidate_checkpoint
    from ember.strategies.checkpoint_io import CheckpointError, read_manifest

    out = Path(args.out)
    if out.is_dir():
        parser.error(f"OUT {args.out!r} is a directory; give the path of the safetensors file to write")
    if out.exists() and not args.force:
        parser.error(f"OUT {args.out!r} exists; pass --force to replace it")
    try:
        manifest = read_manifest(Path(args.checkpoint))
    except CheckpointError as err:
        parser.error(f"CKPT_DIR: {err}")
    models = manifest["counts"]["models"]
    if not 0 <= args.model < models:
        parser.error(f"--model {args.model} is not in [0, {models}): the checkpoint holds {models} model(s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = consolidate_checkpoint(Path(args.checkpoint), out, manifest, args.model)
    print(f"wrote {len(names)} tensors to {out}")
    return 0


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that can fail happens here, before a process starts."""
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} must be in [0, {args.nnodes}) for --nnodes {args.nnodes}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        parser.error(f"--master-port {args.master_port} must be in [1, 65535]")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts {args.max_restarts} must be >= 0")
    if not args.module and not os.path.isfile(args.script):
        parser.error(f"script {args.script!r} does not exist or is not a file")
    from ember.precision import PRECISION_REGISTRY, resolve_precision
    from ember.strategies import STRATEGY_REGISTRY

    if args.strategy is not None and args.strategy != "auto" and args.strategy not in STRATEGY_REGISTRY:
        parser.error(
            f"--strategy {args.strategy!r} is not a known strategy. Valid choices: "
            + ", ".join(repr(n) for n in ["auto", *STRATEGY_REGISTRY.names()])
        )
    if args.strategy is not None and args.strategy != "auto":
        try:
            STRATEGY_REGISTRY.create(args.strategy).check_world_size(args.nproc_per_node * args.nnodes)
        except (ValueError, ImportError) as err:
            parser.error(
                f"--strategy {args.strategy!r} with {args.nnodes} x {args.nproc_per_node} processes: {err}"
            )
    if args.precision is not None:
        try:
            resolve_precision(args.precision, device_type="cpu")
        except ValueError:
            parser.error(
                f"--precision {args.precision!r} is not a known precision. Valid choices: "
                + ", ".join(repr(n) for n in PRECISION_REGISTRY.names())
            )


def torchrun_args(args: argparse.Namespace) -> list[str]:
    """The torchrun command line equivalent to a parsed ``ember launch``."""
    argv = [
        f"--nproc-per-node={args.nproc_per_node}",
        f"--nnodes={args.nnodes}",
        f"--max-restarts={args.max_restarts}",
    ]
    if args.nnodes == 1 and args.master_port is None:
        argv.append("--standalone")
    else:  # static rendezvous: node 0's agent hosts the store at master_addr:master_port
        port = args.master_port if args.master_port is not None else 29500
        argv += [
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={port}",
        ]
    if args.module:
        argv.append("--module")
    return [*argv, args.script, *args.script_args]


def launch(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for key in ("strategy", "precision", "accelerator"):
        value = getattr(args, key)
        if value is not None:
            os.environ[f"EMBER_{key.upper()}"] = value  # read by the script's Accelerator (environment.py)
    try:
        torchrun_main(torchrun_args(args))
    except ChildFailedError:
        return 1  # torchrun already printed which rank failed, with its traceback
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "launch":
        _validate(parser, args)
        return launch(args)
    if args.command == "consolidate":
        return _consolidate(parser, args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first


if __name__ == "__main__":
    sys.exit(main())
