"""The DeepSpeed strategy: ``deepspeed.initialize`` owns the model, the optimizer and the step."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ember._registry import Registry
from ember.precision import DoublePrecision, Precision
from ember.strategies.base import Strategy
from ember.strategies.capabilities import EngineCheckpoints, OwnsOptimizerStep
from ember.strategies.deepspeed.config import DeepSpeedConfig, _auto_keys, _fill_model_autos
from ember.strategies.deepspeed.names import strategy_config
from ember.strategies.deepspeed.runtime import configure_checkpointing, configure_logging_and_ops
from ember.strategies.environment import ProcessEnvironment, ensure_local_rank
from ember.strategies.parallel import ParallelStrategy
from ember.strategies.sharded_io import TensorSpec

__all__ = ["DeepSpeedStrategy", "zero_checkpoint_weights"]

log = logging.getLogger("ember")


class DeepSpeedStrategy(ParallelStrategy, OwnsOptimizerStep, EngineCheckpoints):
    """ZeRO data parallelism on ``deepspeed.initialize``.

    Example::

        Trainer(strategy="deepspeed_stage_3", devices=2, precision="bf16-mixed")
        Accelerator(strategy=DeepSpeedStrategy(DeepSpeedConfig(config="ds_config.json")))
    """

    evaluates_in_inference_mode = False
    supports_weight_averaging = False
    supports_trainable_refresh = False

    strategy_name = "deepspeed"

    def __init__(
        self, config: DeepSpeedConfig | dict[str, Any] | str | os.PathLike[str] | None = None, **options: Any
    ) -> None:
        self.config = strategy_config(config, options)  # Lightning's keywords and config=<dict or path> too
        super().__init__(process_group_backend=self.config.process_group_backend, timeout=self.config.timeout)
        self.micro_batch_size = None
        self.gradient_accumulation_steps = 1
        self._clip: tuple[float | None, str] = (None, "")
        self._engine: Any = None
        #: The final DeepSpeed configuration (after ``prepare``).
        self.deepspeed_config: dict[str, Any] = {}

    @classmethod
    @override
    def register_strategies(cls, registry: Registry[Strategy]) -> None:
        registry.register("deepspeed", cls, "DeepSpeed ZeRO stage 2", config=DeepSpeedConfig(stage=2))
        registry.register(
            "deepspeed_stage_1", cls, "ZeRO-1: optimizer state partitioned", config=DeepSpeedConfig(stage=1)
        )
        registry.register(
            "deepspeed_stage_2",
            cls,
            "ZeRO-2: optimizer state and gradients partitioned",
            config=DeepSpeedConfig(stage=2),
        )
        registry.register(
            "deepspeed_stage_2_offload",
            cls,
            "ZeRO-2 with optimizer state and update on the CPU",
            config=DeepSpeedConfig(stage=2, offload_optimizer=True),
        )
        registry.register(
            "deepspeed_stage_3", cls, "ZeRO-3: parameters, gradients and optimizer state partitioned",
            config=DeepSpeedConfig(stage=3),
        )  # fmt: skip
        registry.register(
            "deepspeed_stage_3_offload",
            cls,
            "ZeRO-3 with parameters and optimizer state on the CPU",
            config=DeepSpeedConfig(stage=3, offload_optimizer=True, offload_parameters=True),
        )

    @override
    def connect(
        self, *, device_type: str, num_processes: int, precision: Precision, environment: ProcessEnvironment
    ) -> None:
        if isinstance(precision, DoublePrecision):
            raise ValueError(
                "precision='64-true' is not supported by DeepSpeed. Valid choices with DeepSpeed: "
                "'32-true', 'bf16-mixed', 'bf16-true', '16-mixed', '16-true'"
            )
        if device_type == "cpu" and getattr(precision, "dtype", None) == torch.float16:
            raise ValueError(
                f"precision={precision.name!r} needs DeepSpeed's fp16 mode, which DeepSpeed does not support on "
                "the CPU; use 'bf16-mixed' or 'bf16-true' there"
            )
        self.config._check_precision(precision)
        super().connect(
            device_type=device_type, num_processes=num_processes, precision=precision, environment=environment
        )
        self._fill_config(self.config.user_config(), check_only=True)  # contradictions fail before any launch

    @override
    def configure_training(self, *, gradient_clip_val: float | None, gradient_clip_algorithm: str) -> None:
        if gradient_clip_val and gradient_clip_algorithm != "norm":
            raise ValueError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}: DeepSpeed clips by norm only. Valid choices "
                "with DeepSpeed: 'norm'"
            )
        self._clip = (
            float(gradient_clip_val) if gradient_clip_val else None,
            "Trainer(gradient_clip_val=...)",
        )  # checked against the DeepSpeed config in connect(), which the Accelerator calls next

    # -- the configuration: one source of truth --------------------------------------------------
    def _fill_config(
        self, config: dict[str, Any], *, check_only: bool = False, client_optimizer: bool = True
    ) -> dict[str, Any]:
        ours: dict[str, tuple[Any, str]] = {
            "gradient_accumulation_steps": (
                self.gradient_accumulation_steps,
                "the Accelerator's gradient_accumulation_steps (the Trainer's accumulate_grad_batches)",
            )
        }
        if self.micro_batch_size is not None:
            ours["train_micro_batch_size_per_gpu"] = (
                self.micro_batch_size,
                "the prepared dataloader's batch_size",
            )
        if self._clip[0] is not None:
            ours["gradient_clipping"] = self._clip
        for key, (value, source) in ours.items():
            given = config.get(key, "auto")
            if given != "auto" and given != value:
                raise ValueError(f"the DeepSpeed config says {key}={given!r}, but {source} is {value!r}")
            config[key] = value
        if not check_only:  # the micro batch, so the total batch, is known once a dataloader is prepared
            micro = config.get("train_micro_batch_size_per_gpu", "auto")
            if micro == "auto":
                micro = config["train_micro_batch_size_per_gpu"] = 1
            total = micro * config["gradient_accumulation_steps"] * self.world_size
            given_total = config.get("train_batch_size", "auto")
            if given_total not in ("auto", total):
                raise ValueError(
                    f"the DeepSpeed config says train_batch_size={given_total!r}, but micro batch {micro} x "
                    f"accumulation {config['gradient_accumulation_steps']} x {self.world_size} processes is {total}"
                )
            config["train_batch_size"] = total
        if config.get("gradient_clipping", "auto") == "auto":
            config["gradient_clipping"] = 0.0
        # precision -> the fp16 / bf16 blocks
        dtype = getattr(self.precision, "dtype", torch.float32)
        wanted = {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}
        for block, enabled in wanted.items():
            settings = config.setdefault(block, {})
            given = settings.get("enabled", "auto")
            if given != "auto" and bool(given) != enabled:
                raise ValueError(
                    f"the DeepSpeed config says {block}.enabled={given!r}, but precision={self.precision.name!r} "
                    f"{'needs' if enabled else 'rules out'} DeepSpeed's {block} mode"
                )
            settings["enabled"] = enabled
        zero = config.setdefault("zero_optimization", {"stage": 0})
        if client_optimizer and "optimizer" not in config:
            # Any torch optimizer works under ZeRO (as in Lightning); DeepSpeed asks to be told so.
            config.setdefault("zero_allow_untested_optimizer", True)
            if "offload_optimizer" in zero:  # likewise for a torch optimizer with offloaded state
                config.setdefault("zero_force_ds_cpu_optimizer", False)
        if not check_only:
            self.deepspeed_config = config
        return config

    # -- models and optimizers ---------------------------------------------------------------------
    @override
    def setup_module_and_optimizers(
        self, modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
        if not modules:
            if optimizers:
                raise ValueError("DeepSpeed: prepare() the optimizer together with its model")
            return [], []
        if len(modules) > 1 or len(optimizers) > 1 or self._engine is not None:
            raise ValueError(
                "DeepSpeed runs one model with at most one optimizer per strategy; prepare() them once, together"
            )
        import deepspeed

        config = self.config.user_config()
        if optimizers and "optimizer" in config:
            raise ValueError(
                "the DeepSpeed config has an 'optimizer' block and prepare() also got an optimizer: use one of the two"
            )
        if not optimizers and "optimizer" not in config:
            raise ValueError(
                "DeepSpeed needs an optimizer: prepare() one with the model, or give an 'optimizer' block"
            )
        config = self._fill_config(config, client_optimizer=bool(optimizers))
        _fill_model_autos(config, modules[0])
        left = _auto_keys(config)
        if left:  # DeepSpeed would drop an "auto" for its default without a word, or crash on it (an lr)
            raise ValueError(
                f"the DeepSpeed config leaves {', '.join(left)} at 'auto', which ember does not fill: give a value. "
                "ember fills 'auto' only in train_micro_batch_size_per_gpu, train_batch_size, "
                "gradient_accumulation_steps, gradient_clipping, fp16/bf16.enabled, "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save, and (from model.config.hidden_size, "
                "as in Accelerate) zero_optimization.reduce_bucket_size, stage3_prefetch_bucket_size and "
                "stage3_param_persistence_threshold"
            )
        if self.is_global_zero:
            log.info("DeepSpeed configuration: %s", json.dumps(config, sort_keys=True))
        configure_logging_and_ops(
            logging_level=self.config.logging_level, on_cpu=self.root_device.type == "cpu"
        )
        module = modules[0].to(self.root_device)
        # DeepSpeed's engine insists on LOCAL_RANK, which a launcher sets; a plain `python train.py` has none.
        ensure_local_rank(self.local_rank)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizers[0] if optimizers else None,
            model_parameters=None if optimizers else [p for p in module.parameters() if p.requires_grad],
            config=config,
            dist_init_required=False,
        )
        configure_checkpointing(config)
        self._engine = engine
        # An optimizer from the config's block stays the engine's (``strategy.engine.optimizer``):
        # the engine steps it in backward, so the loop has nothing to call on it.
        return [engine], list(optimizers)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        return self.setup_module_and_optimizers([module], [])[0][0]

    @override
    def unwrap_module(self, module: nn.Module) -> nn.Module:
        inner = getattr(module, "module", None)
        return inner if inner is not None and type(module).__name__ == "DeepSpeedEngine" else module

    @override
    def release(self) -> None:
        if self._engine is not None:  # (Accelerate destroys it too: its hooks and buffers go with it)
            self._engine.destroy()
        self._engine, self.micro_batch_size, self.deepspeed_config = None, None, {}

    @override
    def compile_engine(self, engine: nn.Module, compile_kwargs: dict[str, Any]) -> None:
        options = dict(compile_kwargs)  # (DeepSpeed takes the backend apart from the other options)
        engine.compile(backend=options.pop("backend", "inductor"), compile_kwargs=options)  # type: ignore[operator]

    @property
    def engine(self) -> Any:
        """The ``deepspeed.DeepSpeedEngine`` (after ``prepare``)."""
        if self._engine is None:
            raise RuntimeError("the DeepSpeed engine exists after prepare(model, optimizer)")
        return self._engine

    @override
    def check_client_scheduler(self, scheduler: Any) -> None:
        if "scheduler" in self.config.user_config():
            raise ValueError(
                f"the DeepSpeed config has a 'scheduler' block, and the loop also steps a "
                f"{type(scheduler).__name__}: the engine would step its own scheduler too; use one of the two"
            )

    # -- the step: the engine's own ----------------------------------------------------------------
    @override
    def backward_and_step(self, loss: torch.Tensor, *, boundary: bool, **kwargs: Any) -> None:
        engine = self.engine
        engine.set_gradient_accumulation_boundary(boundary)
        # The Accelerator already divided the loss by the accumulation steps.
        engine.backward(loss, scale_wrt_gas=False, **kwargs)
        engine.step()

    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.backward_and_step(loss, boundary=True, **kwargs)

    @override
    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> bool:
        return bool(self.engine.was_step_applied())  # the engine stepped in backward

    @override
    def clip_gradients_norm(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        max_norm: float,
        norm_type: float = 2.0,
    ) -> torch.Tensor:
        configured = float(self.deepspeed_config.get("gradient_clipping", 0.0))
        if norm_type != 2.0 or abs(configured - max_norm) > 1e-12 * max(1.0, max_norm):
            raise ValueError(
                f"clip_grad_norm_(max_norm={max_norm}, norm_type={norm_type}): DeepSpeed clips inside its step, with "
                f"the 2-norm and the config's gradient_clipping={configured}; set gradient_clipping={max_norm} in "
                "the DeepSpeed config (the Trainer does it from gradient_clip_val)"
            )
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"))

    @override
    def clip_gradients_value(
        self,
        parameters: Iterable[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        clip_value: float,
    ) -> None:
        raise ValueError("DeepSpeed clips gradients by norm only (clip_grad_value_ is not available with it)")

    # -- state -------------------------------------------------------------------------------------
    @override
    def save_engine_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory),
            tag="state",
            save_latest=False,
            exclude_frozen_parameters=self.config.exclude_frozen_parameters,
        )

    @override
    def load_engine_state(self, directory: Path) -> None:
        self.engine.load_checkpoint(
            str(directory),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.config.exclude_frozen_parameters,  # the frozen ones are not in the files
        )

    def _stage(self) -> int:
        return int(self._engine.zero_optimization_stage()) if self._engine is not None else 0

    @override
    def full_tensors(self, module: nn.Module) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
        inner = self.unwrap_module(module)
        if self._stage() != 3:
            return super().full_tensors(module)
        import deepspeed

        state = inner.state_dict(keep_vars=True)
        specs = [(name, t.dtype, tuple(getattr(t, "ds_shape", t.shape))) for name, t in state.items()]

        def gathered() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in state.items():  # every rank gathers each partitioned parameter in turn
                if hasattr(tensor, "ds_id"):
                    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                        yield name, tensor.detach().clone()
                else:
                    yield name, tensor.detach()

        return specs, gathered()

    @override
    def module_state_dict(self, module: nn.Module, *, full: bool = True) -> dict[str, torch.Tensor]:
        if self._stage() != 3:
            return self.unwrap_module(module).state_dict()
        return dict(self.full_tensors(module)[1])  # gathered: full tensors on every rank

    @override
    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
    ) -> None:
        inner = self.unwrap_module(module)
        if self._stage() != 3:
            inner.load_state_dict(state, strict=strict)
        else:
            import deepspeed

            # Every rank loads (each has the full state): ZeRO-3 partitions parameters, not buffers,
            # and GatheredParameters hands on rank 0's parameters only.
            with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=0):
                inner.load_state_dict(state, strict=strict)
        optimizer: Any = getattr(self._engine, "optimizer", None)
        if hasattr(optimizer, "refresh_fp32_params"):  # else the next step starts from the old master weights
            optimizer.refresh_fp32_params()


def zero_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint that :meth:`DeepSpeedStrategy.save_engine_state` wrote,
    merged from every rank's partitions by DeepSpeed's zero-to-fp32 code. DeepSpeed's files are
    pickles: this unpickles them (only for checkpoints you trust)."""
    tag = directory / "state"
    if any(tag.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="state")
    else:  # ZeRO stage 0: the engine's model file holds the whole module
        state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
            "module"
        ]
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}
