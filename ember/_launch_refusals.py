"""The options of 🤗 Accelerate's and torchrun's launchers that ``ember launch`` does not take: each is
refused with what to use instead, rather than argparse's "unrecognized arguments"."""

from __future__ import annotations

__all__ = ["refusal"]

_NOT_TAKEN: dict[str, str] = {
    "--gradient_accumulation_steps": "pass Accelerator(gradient_accumulation_steps=N) or "
    "Trainer(accumulate_grad_batches=N) in the script",
    "--gradient_clipping": "call accelerator.clip_grad_norm_(...) or pass Trainer(gradient_clip_val=...) in the script",
    "--dynamo_": "pass Accelerator(dynamo_backend=...) in the script",
    "--main_training_function": "ember launch runs SCRIPT top to bottom on every process; to start a function, "
    "call ember.notebook_launcher(function, num_processes=N)",
    "--tpu": "ember launch runs on one TPU host with --accelerator xla; it does not start TPU pods",
    "--no_tpu_cluster": "ember launch does not start TPU pods",
    "--vm": "ember launch does not start TPU pods",
    "--env": "ember launch does not start TPU pods; export the variables before ember launch",
    "--gpu_ids": "set CUDA_VISIBLE_DEVICES=0,1 (for example) for ember launch",
    "--downcast_bf": "pass --precision bf16-true",
    "--enable_cpu_affinity": "ember launch does not bind processes to CPUs",
    "--numa": "ember launch does not bind processes to CPUs",
    "--deepspeed_": "ember launch starts DeepSpeed through torchrun: run it on each node with --nnodes and "
    "--node-rank; pass a DeepSpeed config as DeepSpeedStrategy(DeepSpeedConfig(...)) in the script",
    "--zero3_": "pass DeepSpeedStrategy(DeepSpeedConfig(...)) in the script",
    "--offload_": "ember maps only --offload_optimizer_device/--offload_param_device {none,cpu}; for NVMe, pass "
    "DeepSpeedStrategy(DeepSpeedConfig(...)) in the script",
    "--fsdp_": "ember maps only --fsdp_sharding_strategy, --fsdp_reshard_after_forward and --fsdp_offload_params; "
    "pass FSDPStrategy(FSDPConfig(...)) in the script for the rest",
    "--use_megatron_lm": "ember has no Megatron-LM strategy",
    "--megatron_lm_": "ember has no Megatron-LM strategy",
    "--use_parallelism_config": "ember has no tensor/context parallelism config",
    "--parallelism_config_": "ember has no tensor/context parallelism config",
    "--fp8_": "ember has no FP8 precision",
    "--mpirun_hostfile": "ember launch starts torchrun on each node: --nnodes, --node-rank, --master-addr",
    "--aws_": "ember launch does not start SageMaker jobs",
    "--quiet": "pass --local-ranks-filter 0 to show only local rank 0's output",
    "-q": "pass --local-ranks-filter 0 to show only local rank 0's output",
    "--role": "ember launch does not take torchrun's --role",
    "--rdzv-conf": "ember launch does not take torchrun's --rdzv-conf",
    "--rdzv_conf": "ember launch does not take torchrun's --rdzv-conf",
    "--start-method": "torchrun's default start method is used",
    "--start_method": "torchrun's default start method is used",
}


def refusal(command: str, extras: list[str]) -> str:
    """The error for options ``ember COMMAND`` did not recognise: for a known option of 🤗 Accelerate
    or torchrun, what to use instead."""
    options = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    if command == "launch":
        for option in options:
            for prefix in sorted(_NOT_TAKEN, key=len, reverse=True):
                if option == prefix or (prefix.endswith("_") and option.startswith(prefix)) or (
                    prefix in ("--tpu", "--downcast_bf", "--numa") and option.startswith(prefix)):  # fmt: skip
                    return f"ember launch does not take {option}: {_NOT_TAKEN[prefix]}"
    if options:
        hint = (
            " (options go before SCRIPT; everything after SCRIPT goes to the script)"
            if command == "launch"
            else ""
        )
        return f"unrecognized option {options[0]} for ember {command}; see ember {command} --help{hint}"
    return "unrecognized arguments: " + " ".join(extras)
