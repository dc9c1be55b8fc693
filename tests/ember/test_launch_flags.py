"""`ember launch` with the options of torchrun and `accelerate launch`: mapped, passed on, or refused
with the ember equivalent, always before anything starts; and 🤗 Accelerate's config file.

Every case here runs ``ember.cli.main``/``_validate`` in this process; the real launches are in test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dist_helpers import REPO

from ember import cli
from ember._launch_config import read_config

EXAMPLE = str(REPO / "examples" / "accelerate_loop.py")


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def launch(args: Any) -> int:
        raise AssertionError(f"ember launch started processes for {args}")

    monkeypatch.setattr(cli, "launch", launch)


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _args(argv: list[str]) -> Any:
    parser = cli._parser()
    args = parser.parse_args(["launch", *argv])
    cli._validate(parser, args)
    return args


@pytest.mark.parametrize(
    ("argv", "strategy"),
    [
        (["--use_deepspeed"], "deepspeed_stage_2"),  # Accelerate's default stage
        (["--use_deepspeed", "--zero_stage", "1"], "deepspeed_stage_1"),
        (["--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu"], "deepspeed_stage_2_offload"),
        (["--use_deepspeed", "--zero_stage", "3", "--offload_optimizer_device", "cpu",
          "--offload_param_device", "cpu"], "deepspeed_stage_3_offload"),
        (["--use_fsdp"], "fsdp"),
        (["--use_fsdp", "--fsdp_sharding_strategy", "SHARD_GRAD_OP"], "fsdp_shard_grad_op"),
        (["--use_fsdp", "--fsdp_reshard_after_forward", "false"], "fsdp_shard_grad_op"),
        (["--use_fsdp", "--fsdp_sharding_strategy", "HYBRID_SHARD"], "fsdp_hybrid"),
        (["--use_fsdp", "--fsdp_offload_params", "true"], "fsdp_offload"),
    ],
)  # fmt: skip
def test_accelerate_strategy_flags_become_a_strategy_name(argv: list[str], strategy: str) -> None:
    args = _args(["--nproc-per-node", "2", *argv, EXAMPLE])
    assert args.strategy == strategy


def test_torchrun_options_pass_through_and_spellings() -> None:
    args = _args(["--nproc_per_node", "2", "--max_restarts", "1", "--cpu", "--monitor-interval", "0.5",
                  "--log-dir", "logs", "--tee", "3", "-r", "0:1", "--local-ranks-filter", "0", EXAMPLE])  # fmt: skip
    assert args.accelerator == "cpu"
    assert cli.torchrun_args(args) == ["--nproc-per-node=2", "--nnodes=1", "--max-restarts=1", "--standalone",
                                       "--monitor-interval=0.5", "--log-dir=logs", "--redirects=0:1", "--tee=3",
                                       "--local-ranks-filter=0", EXAMPLE]  # fmt: skip
    c10d = _args(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "--rdzv-id", "j7",
                  EXAMPLE])  # fmt: skip
    assert cli.torchrun_args(c10d)[3:6] == [
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=head:29400",
        "--rdzv-id=j7",
    ]
    static = _args(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:29400", EXAMPLE])
    assert cli.torchrun_args(static)[3:6] == ["--node-rank=1", "--master-addr=head", "--master-port=29400"]
    assert _args(["--standalone", EXAMPLE]).standalone
    run_path = _args(["--run-path", "examples/accelerate_loop.py"])
    assert cli.torchrun_args(run_path)[-2:] == ["--run-path", EXAMPLE]  # torchrun wants an absolute path
    assert cli.torchrun_args(_args(["--no-python", "true"]))[-2:] == ["--no-python", "true"]  # a command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gradient_accumulation_steps", "4"],
         "ember launch does not take --gradient_accumulation_steps: pass Accelerator(gradient_accumulation_steps=N)"),
        (["--gradient_clipping", "1.0"], "call accelerator.clip_grad_norm_(...) or pass Trainer(gradient_clip_val"),
        (["--dynamo_backend", "inductor"], "pass Accelerator(dynamo_backend=...) in the script"),
        (["--main_training_function", "main"], "call ember.notebook_launcher(function, num_processes=N)"),
        (["--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP"], "--fsdp_auto_wrap_policy: ember maps only"),
        (["--megatron_lm_tp_degree", "2"], "--megatron_lm_tp_degree: ember has no Megatron-LM strategy"),
        (["--tpu"], "it does not start TPU pods"),
        (["--gpu_ids", "0,1"], "set CUDA_VISIBLE_DEVICES=0,1"),
        (["--deepspeed_config_file", "ds.json"], "DeepSpeedStrategy(DeepSpeedConfig(...))"),
        (["--bogus"], "unrecognized option --bogus for ember launch; see ember launch --help (options go before SCRIPT"),
        (["--nnodes", "1:2"], "--nnodes '1:2': ember launch runs a fixed number of nodes, not a MIN:MAX range"),
        (["--zero_stage", "3"], "--zero_stage configures DeepSpeed: add --use_deepspeed"),
        (["--use_deepspeed", "--zero_stage", "4"], "--zero_stage '4' is not a valid choice. Valid choices: '1', '2', '3'"),
        (["--use_deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu"],
         "deepspeed_stage_3_offload offloads both to the CPU"),
        (["--use_deepspeed", "--offload_param_device", "cpu"], "--offload_param_device cpu needs --zero_stage 3"),
        (["--use_deepspeed", "--offload_optimizer_device", "nvme"], "--offload_optimizer_device 'nvme' is not a valid"),
        (["--use_deepspeed", "--strategy", "ddp"], "--use_deepspeed means --strategy deepspeed_stage_2, but --strategy ddp"),
        (["--use_fsdp", "--use_deepspeed"], "pass --use_deepspeed or --use_fsdp, not both"),
        (["--use_fsdp", "--fsdp_sharding_strategy", "SHARD_GRAD_OP", "--fsdp_offload_params", "true"],
         "--fsdp_offload_params true works with FULL_SHARD only"),
        (["--cpu", "--accelerator", "cuda"], "--cpu runs on the CPU, but --accelerator cuda was given"),
        (["--num_cpu_threads_per_process", "0"], "--num_cpu_threads_per_process 0 must be >= 1"),
        (["--monitor-interval", "-1"], "--monitor-interval '-1' must be a number of seconds > 0"),
        (["--tee", "9"], "--tee '9' is not valid; expected 0 (none), 1 (stdout), 2 (stderr), 3 (both)"),
        (["--local-ranks-filter", "a"], "--local-ranks-filter 'a' is not valid"),
        (["--rdzv-backend", "etcd"], "--rdzv-backend 'etcd' is not a valid choice. Valid choices: 'static', 'c10d'"),
        (["--rdzv-backend", "c10d"], "--rdzv-backend c10d needs --rdzv-endpoint HOST:PORT"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "--node-rank", "0"], "--node-rank is assigned by"),
        (["--rdzv-endpoint", "h"], "--rdzv-endpoint 'h' is not HOST:PORT"),
        (["--rdzv-endpoint", "h:1", "--master-port", "2"], "pass --rdzv-endpoint or --master-port, not both"),
        (["--rdzv-id", "j"], "--rdzv-id names a c10d rendezvous: add --rdzv-backend c10d"),
        (["--standalone", "--nnodes", "2"], "--standalone runs one node, not --nnodes 2"),
        (["--standalone", "--master-port", "29500"], "--standalone picks a free local port"),
        (["-m", "--no-python"], "-m runs a module with python: it cannot go with --no-python"),
    ],
)  # fmt: skip
def test_options_ember_does_not_take_or_bad_values_fail_before_anything_starts(
    capsys: pytest.CaptureFixture[str], no_launch: None, argv: list[str], message: str
) -> None:
    assert message in _fails(capsys, ["launch", *argv, EXAMPLE])


def test_no_python_takes_a_command_on_path(capsys: pytest.CaptureFixture[str], no_launch: None) -> None:
    assert "'no-such-cmd' is neither a file nor a command on PATH" in _fails(
        capsys, ["launch", "--no-python", "no-such-cmd"]
    )


# -- 🤗 Accelerate's config file -----------------------------------------------------------------------
_MULTI_CPU = {"compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": "MULTI_CPU",
              "downcast_bf16": "no", "enable_cpu_affinity": False, "machine_rank": 1, "main_process_ip": "10.0.0.1",
              "main_process_port": 29501, "main_training_function": "main", "mixed_precision": "bf16",
              "num_machines": 2, "num_processes": 4, "rdzv_backend": "static", "same_network": True,
              "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": True}  # fmt: skip


def test_an_accelerate_config_file_is_read(tmp_path: Path) -> None:
    config = tmp_path / "default_config.yaml"
    config.write_text(json.dumps(_MULTI_CPU))  # `accelerate config default` writes JSON, which is YAML too
    assert read_config(str(config)) == {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1",
                                        "master_port": 29501, "precision": "bf16", "accelerator": "cpu",
                                        "nproc_per_node": 2}  # fmt: skip
    args = _args(["--config_file", str(config), EXAMPLE])
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.precision) == (2, 2, 1, "bf16")
    # num_processes counts over all machines: split over the command line's --num_machines, as Accelerate does
    args = _args(["--config_file", str(config), "--num_machines", "1", "--machine_rank", "0", EXAMPLE])
    assert (args.nproc_per_node, args.nnodes) == (4, 1)
    assert _args(["--config_file", str(config), "--nproc-per-node", "3", EXAMPLE]).nproc_per_node == 3
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 2\nmixed_precision: 'no'\nfsdp_config:\n"
                    "  fsdp_sharding_strategy: SHARD_GRAD_OP\n  fsdp_version: 2\n")  # fmt: skip
    assert _args(["--config_file", str(fsdp), EXAMPLE]).strategy == "fsdp_shard_grad_op"
    deepspeed = tmp_path / "ds.yaml"
    deepspeed.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 3\n"
                         "  offload_optimizer_device: cpu\n  offload_param_device: cpu\n"
                         "  gradient_accumulation_steps: 1\n  zero3_init_flag: false\n")  # fmt: skip
    assert _args(["--config_file", str(deepspeed), EXAMPLE]).strategy == "deepspeed_stage_3_offload"


def test_an_accelerate_config_names_every_setting_ember_does_not_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: None
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 2\ngpu_ids: '0,1'\ndynamo_config:\n"
                      "  dynamo_backend: INDUCTOR\nfsdp_config:\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                      "  fsdp_sharding_strategy: FULL_SHARD\n")  # fmt: skip
    err = _fails(capsys, ["launch", "--config-file", str(config), EXAMPLE])
    assert "is a 🤗 Accelerate config with settings ember launch does not take: gpu_ids: '0,1', " in err
    assert "dynamo_config: {'dynamo_backend': 'INDUCTOR'}" in err
    assert "fsdp_config.fsdp_auto_wrap_policy: 'TRANSFORMER_BASED_WRAP'" in err
    config.write_text("distributed_type: MULTI_NPU\nnum_processes: 3\nnum_machines: 2\n")
    assert "does not take: distributed_type: 'MULTI_NPU'" in _fails(
        capsys, ["launch", "--config-file", str(config), EXAMPLE]
    )
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 3\nnum_machines: 2\n")
    assert "num_processes 3 does not divide evenly over num_machines 2" in _fails(
        capsys, ["launch", "--config-file", str(config), EXAMPLE]
    )
