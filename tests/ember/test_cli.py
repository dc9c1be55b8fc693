"""`ember launch`: the seed example on 1 and 2 processes, two nodes over loopback, bad arguments."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from dist_helpers import PYTHON, REPO, base_env, free_port, run_command

from ember.cli import _parser, torchrun_args

EMBER = str(Path(PYTHON).parent / "ember")
EXAMPLE = str(REPO / "examples" / "accelerate_loop.py")


def test_seed_example_runs_with_python() -> None:
    result = run_command([PYTHON, EXAMPLE, "--epochs", "2"])
    assert result.returncode == 0, result.stderr
    assert "1 process(es), strategy=SingleDeviceStrategy" in result.stdout
    assert "epoch 1:" in result.stdout and "on 500 samples" in result.stdout


def test_seed_example_runs_with_ember_launch_on_two_processes() -> None:
    result = run_command([EMBER, "launch", "--nproc-per-node", "2", EXAMPLE, "--epochs", "2"])
    assert result.returncode == 0, result.stderr
    assert "2 process(es), strategy=DDPStrategy" in result.stdout
    assert result.stdout.count("epoch 1:") == 1  # printed by the main process only
    assert "on 500 samples" in result.stdout  # gather_for_metrics: every eval sample exactly once


def test_python_dash_m_ember_passes_strategy_and_precision() -> None:
    result = run_command(
        [
            PYTHON,
            "-m",
            "ember",
            "launch",
            "--nproc-per-node",
            "2",
            "--precision",
            "bf16-mixed",
            "--strategy",
            "ddp",
            EXAMPLE,
            "--epochs",
            "1",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "strategy=DDPStrategy, precision=bf16-mixed" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc-per-node", "0"], "--nproc-per-node 0 must be >= 1"),
        (["--nproc-per-node", "two"], "--nproc-per-node 'two' is not an integer"),
        (["--strategy", "fsdq"], "--strategy 'fsdq' is not a known strategy. Valid choices: 'auto', 'ddp'"),
        (["--precision", "fp7"], "--precision 'fp7' is not a known precision. Valid choices: '16-mixed'"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank 2 must be in [0, 2)"),
        (["--master-port", "70000"], "--master-port 70000 must be in [1, 65535]"),
        (
            ["--num_processes", "2", "--nproc-per-node", "2"],
            "pass --nproc-per-node (per node) or --num_processes",
        ),
        (
            ["--num_processes", "3", "--num_machines", "2"],
            "--num_processes 3 does not divide evenly over --nnodes 2",
        ),
        (
            ["--multi_gpu", "--accelerator", "cpu"],
            "--multi_gpu runs on GPUs, but --accelerator cpu was given",
        ),
        (["--mixed_precision", "fp8"], "--precision 'fp8' is not a known precision"),
    ],
)
def test_bad_arguments_fail_before_anything_starts(args: list[str], message: str) -> None:
    result = run_command([EMBER, "launch", *args, EXAMPLE], timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "torch.distributed" not in result.stderr and result.stdout == ""  # torchrun never started


def test_missing_script() -> None:
    result = run_command([EMBER, "launch", "no_such_script.py"], timeout=60)
    assert result.returncode == 2 and "script 'no_such_script.py' does not exist" in result.stderr


def test_failing_script_returns_nonzero() -> None:
    result = run_command(
        [EMBER, "launch", "--nproc-per-node", "2", "-m", "ember.no_such_module"], timeout=120
    )
    assert result.returncode == 1


def test_torchrun_arguments() -> None:
    parser = _parser()
    single = torchrun_args(parser.parse_args(["launch", "--nproc-per-node", "4", "train.py", "--lr", "1"]))
    assert single == [
        "--nproc-per-node=4",
        "--nnodes=1",
        "--max-restarts=0",
        "--standalone",
        "train.py",
        "--lr",
        "1",
    ]
    multi = torchrun_args(
        parser.parse_args(
            [
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "h",
                "--max-restarts",
                "3",
                "train.py",
            ]
        )
    )
    assert multi == [
        "--nproc-per-node=1",
        "--nnodes=2",
        "--max-restarts=3",
        "--node-rank=1",
        "--master-addr=h",
        "--master-port=29500",
        "train.py",
    ]


def test_accelerate_launch_options(tmp_path: Path) -> None:
    # `accelerate launch`'s names: the same options; --num_processes counts over all machines.
    from ember.cli import _validate

    script = tmp_path / "train.py"
    script.write_text("")
    parser = _parser()
    args = parser.parse_args(["launch", "--num_processes", "4", "--num_machines", "2", "--machine_rank", "1",
                              "--main_process_ip", "h", "--main_process_port", "1234", "--mixed_precision", "fp16",
                              "--multi_gpu", str(script)])  # fmt: skip
    _validate(parser, args)
    assert (args.precision, args.accelerator) == ("fp16", "cuda")
    assert torchrun_args(args) == [
        "--nproc-per-node=2",
        "--nnodes=2",
        "--max-restarts=0",
        "--node-rank=1",
        "--master-addr=h",
        "--master-port=1234",
        str(script),
    ]


def test_two_nodes_on_loopback_form_one_job(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, torch
        from ember import Accelerator
        accelerator = Accelerator()
        total = accelerator.reduce(torch.tensor([float(accelerator.process_index)]), "sum").item()
        with open({str(tmp_path)!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
            json.dump({{"world": accelerator.num_processes, "local": accelerator.local_process_index,
                        "node": accelerator.strategy.node_rank, "total": total}}, f)
    """)
    )
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                EMBER,
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "--nproc-per-node",
                "1",
                str(script),
            ],
            env=base_env(),
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results == [
        {"world": 2, "local": 0, "node": 0, "total": 1.0},
        {"world": 2, "local": 0, "node": 1, "total": 1.0},
    ]
