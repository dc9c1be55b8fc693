"""`ember launch`: the seed example on 1 and 2 processes, two nodes over loopback, bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
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
        (
            ["--strategy", "ddp_spawn"],
            "'ddp_spawn' is not a known strategy. ember does not spawn or fork the ranks",
        ),
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


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_on_loopback_form_one_job(tmp_path: Path, rendezvous: str) -> None:
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
                *(
                    ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port]
                    if rendezvous
                    == "static"  # c10d: the same command on every node, ranks from the rendezvous
                    else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
                ),
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


def test_a_failing_ranks_exit_code_is_ember_launchs(tmp_path: Path) -> None:
    # As torchrun's agent reports it: the first failure's code, here rank 1's 3 (torchrun itself exits 1).
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(60)\n"
    )
    result = run_command([EMBER, "launch", "--nproc-per-node", "2", str(script)], timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]


def test_sigterm_stops_every_rank_and_exits_143(tmp_path: Path) -> None:
    script = tmp_path / "sleep.py"
    script.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen([EMBER, "launch", "--nproc-per-node", "2", str(script)], env=base_env(),
                                cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid*"))]
        assert len(pids) == 2, "the ranks did not start"
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]  # as a shell reports a signal
    assert "ember launch: stopped by SIGTERM; every process was stopped" in err
    assert "Traceback" not in err
    for pid in pids:  # torchrun's agent stopped (and reaped) both ranks before returning
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


_SHOW_ENV = """
import json, os, torch
from ember import Accelerator
accelerator = Accelerator()
print("rank", os.environ["RANK"], json.dumps({
    "strategy": type(accelerator.strategy).__name__, "device": str(accelerator.device),
    "EMBER_STRATEGY": os.environ.get("EMBER_STRATEGY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    "threads": torch.get_num_threads(), "debug": os.environ.get("TORCH_DISTRIBUTED_DEBUG")}), flush=True)
"""


def test_accelerate_and_torchrun_flags_reach_the_script(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(_SHOW_ENV)
    logs = tmp_path / "logs"
    result = run_command(
        [EMBER, "launch", "--nproc_per_node", "2", "--cpu", "--num_cpu_threads_per_process", "2", "--debug",
         "--use_fsdp", "--fsdp_sharding_strategy", "SHARD_GRAD_OP", "--local-ranks-filter", "0",
         "--log-dir", str(logs), "--tee", "1", str(script)],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [line for line in result.stdout.splitlines() if "rank " in line]
    assert len(shown) == 1 and "rank 0 " in shown[0], result.stdout  # --local-ranks-filter 0
    report = json.loads(shown[0].split(" ", 2)[2])
    assert report == {"strategy": "FSDPStrategy", "device": "cpu", "EMBER_STRATEGY": "fsdp_shard_grad_op",
                      "OMP_NUM_THREADS": "2", "threads": 2, "debug": "DETAIL"}  # fmt: skip
    teed = [path.read_text() for path in logs.rglob("stdout.log")]  # --tee 1: every rank's stdout, in files
    assert sorted(text.split(" ", 2)[1] for text in teed) == ["0", "1"], teed
