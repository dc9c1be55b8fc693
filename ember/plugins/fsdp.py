"""🤗 Accelerate's ``FullyShardedDataParallelPlugin``, translated into ember's FSDP2 strategy and its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ember._validation import check_bool, check_int, show
from ember.plugins._checks import only, refuse

if TYPE_CHECKING:
    from ember.strategies import FSDPStrategy

__all__ = ["FullyShardedDataParallelPlugin"]


_SHARDING = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP", 3: "NO_SHARD", 4: "HYBRID_SHARD", 5: "HYBRID_SHARD_ZERO2"}
# (reshard_after_forward, hybrid) of each sharding strategy FSDP2 can run
_SHARDING_FSDP2 = {"FULL_SHARD": (True, False), "SHARD_GRAD_OP": (False, False),
                   "HYBRID_SHARD": (True, True), "HYBRID_SHARD_ZERO2": (False, True)}  # fmt: skip
_STATE_DICT = {1: "FULL_STATE_DICT", 2: "LOCAL_STATE_DICT", 3: "SHARDED_STATE_DICT"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PRECISION_OF = {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed", torch.float32: "32-true"}


def _enum_name(value: Any, names: dict[int, str]) -> Any:
    """A torch enum member, its int value or its name (any case; digits too) -> its name."""
    if hasattr(value, "name") and hasattr(value, "value"):
        value = value.value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return names.get(value, value)
    return value.upper().lstrip("_") if isinstance(value, str) else value


class _LargerThan:
    """Accelerate's FSDP2 size-based wrap: every submodule holding more than ``min_num_params``
    parameters (containers without a forward excepted: FSDP gathers a unit in its forward)."""

    def __init__(self, min_num_params: int) -> None:
        self.min_num_params = min_num_params

    def __call__(self, module: torch.nn.Module) -> bool:
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            return False
        return sum(p.numel() for p in module.parameters()) > self.min_num_params

    def __repr__(self) -> str:
        return f"size_based_wrap(min_num_params={self.min_num_params})"


@dataclass
class FullyShardedDataParallelPlugin:
    """FSDP settings (🤗 Accelerate's fields), run on ember's FSDP2 strategy.

    ``sharding_strategy`` (``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"HYBRID_SHARD"``,
    ``"HYBRID_SHARD_ZERO2"``, their ints or torch's enum) or ``reshard_after_forward`` choose when
    parameters are freed; ``auto_wrap_policy`` ``"transformer_based_wrap"`` (with
    ``transformer_cls_names_to_wrap``), ``"size_based_wrap"`` (with ``min_num_params``) or
    ``"no_wrap"``/None (only the root is sharded, as in Accelerate's FSDP2); ``cpu_offload``;
    ``activation_checkpointing`` (of the wrapped block classes); ``state_dict_type``
    (``"SHARDED_STATE_DICT"``, the default, or ``"FULL_STATE_DICT"``); ``mixed_precision_policy``
    (``"bf16"``/``"fp16"``, or a dict / ``MixedPrecisionPolicy`` whose ``param_dtype`` picks the
    ``-mixed`` precision and ``reduce_dtype`` the gradient reduction dtype).
    """

    fsdp_version: int | None = None
    sharding_strategy: Any = None
    reshard_after_forward: bool | None = None
    backward_prefetch: Any = None
    mixed_precision_policy: Any = None
    auto_wrap_policy: Any = None
    cpu_offload: Any = None
    ignored_modules: Any = None
    state_dict_type: Any = None
    state_dict_config: Any = None
    optim_state_dict_config: Any = None
    limit_all_gathers: bool = True
    use_orig_params: bool | None = None
    param_init_fn: Any = None
    sync_module_states: bool | None = None
    forward_prefetch: bool | None = None
    activation_checkpointing: bool | None = None
    activation_checkpointing_offload: bool | None = None
    cpu_ram_efficient_loading: bool | None = None
    transformer_cls_names_to_wrap: list[str] | str | None = None
    min_num_params: int | None = None

    def __post_init__(self) -> None:
        self.strategy()

    def strategy(self) -> tuple[FSDPStrategy, str | None]:
        """The FSDP strategy these fields describe, and the precision ``mixed_precision_policy``
        implies (None: the Accelerator's)."""
        from ember.strategies import FSDPConfig, FSDPStrategy

        name = "FullyShardedDataParallelPlugin"
        only(name, "fsdp_version", self.fsdp_version, (None, 2),
              "ember's FSDP strategy runs FSDP2 (torch.distributed.fsdp.fully_shard)")  # fmt: skip
        fsdp1_only = "an FSDP1 option; FSDP2 has no equivalent"
        for option in (
            "backward_prefetch",
            "ignored_modules",
            "state_dict_config",
            "optim_state_dict_config",
        ):
            only(name, option, getattr(self, option), (None,), fsdp1_only)
        only(
            name, "limit_all_gathers", self.limit_all_gathers, (True,), "FSDP2 always limits its all-gathers"
        )
        only(
            name,
            "use_orig_params",
            self.use_orig_params,
            (None, True),
            "FSDP2 always keeps the original parameters",
        )
        only(name, "forward_prefetch", self.forward_prefetch, (None, False), fsdp1_only)
        only(name, "param_init_fn", self.param_init_fn, (None,), "build the model inside accelerator.init_module("
              "empty_init=True): each process materialises its shards with reset_parameters()")  # fmt: skip
        for option in ("sync_module_states", "cpu_ram_efficient_loading"):
            only(name, option, getattr(self, option), (None, False), "ember does not broadcast rank 0's weights: build "
                  "the model alike on every process (seeded), or inside accelerator.init_module(empty_init=True)")  # fmt: skip
        only(name, "activation_checkpointing_offload", self.activation_checkpointing_offload, (None, False),
              "ember does not offload checkpointed activations")  # fmt: skip
        reshard, hybrid = True, False
        if self.sharding_strategy is not None:
            kind = _enum_name(self.sharding_strategy, _SHARDING)
            if kind not in _SHARDING_FSDP2:
                why = (
                    "nothing is sharded: that is strategy='ddp'" if kind == "NO_SHARD" else "unknown strategy"
                )
                raise refuse(
                    name,
                    "sharding_strategy",
                    self.sharding_strategy,
                    ", ".join(map(repr, _SHARDING_FSDP2)),
                    why,
                )
            reshard, hybrid = _SHARDING_FSDP2[kind]
        if self.reshard_after_forward is not None:
            check_bool("reshard_after_forward", self.reshard_after_forward, owner=name)
            if self.sharding_strategy is not None and self.reshard_after_forward != reshard:
                raise ValueError(
                    f"{name}(reshard_after_forward={self.reshard_after_forward}) contradicts sharding_strategy="
                    f"{show(self.sharding_strategy)}; give one of the two"
                )
            reshard = self.reshard_after_forward
        offload = self.cpu_offload
        if offload is not None and not isinstance(offload, bool):
            kind_name = type(offload).__name__
            if kind_name == "CPUOffload":  # FSDP1's
                offload = bool(offload.offload_params)
            elif kind_name in ("CPUOffloadPolicy", "OffloadPolicy"):  # FSDP2's (ember picks pin_memory)
                offload = kind_name == "CPUOffloadPolicy"
            else:
                raise refuse(
                    name, "cpu_offload", offload, "a bool, CPUOffload or CPUOffloadPolicy", "unknown type"
                )
        state_dict_type = "sharded"
        if self.state_dict_type is not None:
            kind = _enum_name(self.state_dict_type, _STATE_DICT)
            if kind not in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
                raise refuse(name, "state_dict_type", self.state_dict_type, "'SHARDED_STATE_DICT', 'FULL_STATE_DICT'",
                              "ember saves sharded or full state dicts only")  # fmt: skip
            state_dict_type = "full" if kind == "FULL_STATE_DICT" else "sharded"
        wrap = self._wrap()
        checkpointing: set[Any] = set()
        check_bool("activation_checkpointing", self.activation_checkpointing, owner=name, optional=True)
        if self.activation_checkpointing:
            if not isinstance(wrap, set):
                raise refuse(name, "activation_checkpointing", True, "False, or True with auto_wrap_policy="
                              "'transformer_based_wrap'", "ember checkpoints the wrapped block classes")  # fmt: skip
            checkpointing = set(wrap)
        precision, reduce_dtype = _mixed_precision(name, self.mixed_precision_policy)
        config = FSDPConfig(
            wrap=wrap, reshard_after_forward=reshard,
            offload=bool(offload), activation_checkpointing=checkpointing, reduce_dtype=reduce_dtype,
            hybrid=hybrid, state_dict_type=state_dict_type,  # type: ignore[arg-type]
        )  # fmt: skip
        return FSDPStrategy(config), precision

    def _wrap(self) -> Any:
        name, policy = "FullyShardedDataParallelPlugin", self.auto_wrap_policy
        # Any case, as in Accelerate (its config files write "TRANSFORMER_BASED_WRAP").
        if isinstance(policy, str):
            policy = policy.lower()
        names = self.transformer_cls_names_to_wrap
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if self.min_num_params is not None:
            check_int("min_num_params", self.min_num_params, minimum=0, owner=name)
        valid = "None, 'no_wrap', 'transformer_based_wrap', 'size_based_wrap'"
        if policy == "transformer_based_wrap":
            if not names:
                raise refuse(name, "transformer_cls_names_to_wrap", self.transformer_cls_names_to_wrap,
                              "a list of block class names", "auto_wrap_policy='transformer_based_wrap' needs the "
                              "names (🤗 Transformers models list them in model._no_split_modules)")  # fmt: skip
            return set(names)
        if names:
            raise refuse(name, "transformer_cls_names_to_wrap", self.transformer_cls_names_to_wrap, "None",
                          f"it needs auto_wrap_policy='transformer_based_wrap', not {self.auto_wrap_policy!r}")  # fmt: skip
        if policy == "size_based_wrap":
            return _LargerThan(self.min_num_params or 0)
        if self.min_num_params is not None:
            raise refuse(name, "min_num_params", self.min_num_params, "None",
                          f"it needs auto_wrap_policy='size_based_wrap', not {self.auto_wrap_policy!r}")  # fmt: skip
        if policy is None or policy == "no_wrap":
            return None  # as in Accelerate's FSDP2: only the root is sharded
        raise refuse(name, "auto_wrap_policy", self.auto_wrap_policy, valid, "ember takes the policy by name (or use "
                      "FSDPConfig(wrap=<predicate module -> bool>) with strategy=FSDPStrategy(...))")  # fmt: skip


def _mixed_precision(plugin: str, policy: Any) -> tuple[str | None, torch.dtype | None]:
    """(the precision a ``mixed_precision_policy`` implies, its reduction dtype)."""
    if policy is None:
        return None, None
    field = "mixed_precision_policy"
    valid = "'bf16', 'fp16', 'fp32', a dict or a MixedPrecisionPolicy"
    if isinstance(policy, str):
        if policy not in _DTYPES:
            raise refuse(plugin, field, policy, valid, "unknown dtype")
        dtype = _DTYPES[policy]
        return _PRECISION_OF[dtype], dtype
    if isinstance(policy, dict):
        unknown = set(policy) - {"param_dtype", "reduce_dtype", "output_dtype", "cast_forward_inputs"}
        if unknown:
            raise refuse(
                plugin, field, policy, "keys param_dtype, reduce_dtype, output_dtype", "unknown keys"
            )
        values = dict(policy)
    else:
        values = {k: getattr(policy, k) for k in ("param_dtype", "reduce_dtype", "output_dtype",
                                                   "cast_forward_inputs", "buffer_dtype") if hasattr(policy, k)}  # fmt: skip
        if not values:
            raise refuse(plugin, field, policy, valid, "unknown type")
    dtypes = {k: _DTYPES.get(v, v) for k, v in values.items() if k != "cast_forward_inputs"}
    for key, dtype in dtypes.items():
        if dtype is not None and dtype not in _PRECISION_OF:
            raise refuse(plugin, f"{field}[{key!r}]", values[key], "None, bf16, fp16, fp32", "unknown dtype")
    if dtypes.get("output_dtype") not in (None, torch.float32):
        raise refuse(plugin, f"{field}[output_dtype]", values["output_dtype"], "None, torch.float32",
                      "ember's mixed precisions return float32 outputs")  # fmt: skip
    if dtypes.get("buffer_dtype") is not None:
        raise refuse(
            plugin, f"{field}[buffer_dtype]", values["buffer_dtype"], "None", "FSDP2 does not cast buffers"
        )
    if values.get("cast_forward_inputs", True) is not True:
        raise refuse(
            plugin,
            f"{field}[cast_forward_inputs]",
            False,
            "True",
            "ember casts the inputs of a mixed forward",
        )
    param = dtypes.get("param_dtype")
    return (None if param is None else _PRECISION_OF[param]), dtypes.get("reduce_dtype")
