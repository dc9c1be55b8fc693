"""The options of :class:`~ember.strategies.deepspeed.DeepSpeedStrategy`: typed ZeRO settings or a
DeepSpeed configuration (dict or JSON file), checked when the config is made."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ember._validation import check_bool, check_int, check_number, check_process_group, show
from ember.strategies.deepspeed.names import refuse_lightning_options
from ember.strategies.environment import DEEPSPEED_CONFIG_VARIABLE, deepspeed_config_path

__all__ = ["DeepSpeedConfig"]

log = logging.getLogger("ember")


@dataclass(kw_only=True, slots=True, frozen=True)
class DeepSpeedConfig:
    """Options of :class:`DeepSpeedStrategy`.

    Either the typed ZeRO options below, or ``config``: a DeepSpeed configuration dict or the path
    of its JSON file (then the typed options must stay at their defaults). Values ember knows —
    ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``,
    ``gradient_clipping``, the ``fp16``/``bf16`` blocks — may be left out or ``"auto"``.
    ``offload_optimizer`` keeps optimizer state (and the update) on the CPU; ``offload_parameters``
    (stage 3) keeps the parameters there too. The fp16 loss-scaling options apply under a
    ``16-mixed`` / ``16-true`` precision only. ``logging_level``, ``process_group_backend``,
    ``exclude_frozen_parameters`` and ``timeout`` are not DeepSpeed config entries: they apply with
    ``config`` too.
    """

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    allgather_partitions: bool = True
    reduce_scatter: bool = True
    sub_group_size: int = 1_000_000_000
    pin_memory: bool = False
    # fp16 loss scaling (DeepSpeed's defaults; loss_scale 0 is dynamic scaling)
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # DeepSpeed's activation checkpointing (for models that call deepspeed.checkpointing.checkpoint)
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    synchronize_checkpoint_boundary: bool = False
    config: dict[str, Any] | str | os.PathLike[str] | None = None
    logging_level: int = logging.WARNING
    process_group_backend: str | None = None
    exclude_frozen_parameters: bool = False
    timeout: timedelta = field(default_factory=lambda: timedelta(minutes=30))

    def __new__(cls, *args: Any, **options: Any) -> DeepSpeedConfig:
        # Before the generated __init__, whose TypeError would only say "unexpected keyword argument".
        refuse_lightning_options("DeepSpeedConfig", options)
        return object.__new__(cls)  # (a slots dataclass is a new class: no zero-argument super())

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage={show(self.stage)} is not a ZeRO stage. Valid choices: 0, 1, 2, 3")
        for name in (*_BOOLS, "exclude_frozen_parameters"):
            check_bool(name, getattr(self, name), owner="DeepSpeedConfig")
        for name in (
            "sub_group_size",
            "initial_scale_power",
            "loss_scale_window",
            "hysteresis",
            "logging_level",
        ):
            check_int(name, getattr(self, name), minimum=0 if name in ("initial_scale_power", "logging_level") else 1,
                      owner="DeepSpeedConfig")  # fmt: skip
        for name in ("loss_scale", "min_loss_scale"):
            check_number(name, getattr(self, name), minimum=0, owner="DeepSpeedConfig")
        check_process_group(self.process_group_backend, self.timeout, owner="DeepSpeedConfig")
        if self.config is not None and not isinstance(self.config, (dict, str, os.PathLike)):
            raise TypeError(
                f"DeepSpeedConfig(config={show(self.config)}) must be None, a dict or the path of a JSON file"
            )
        if self.offload_parameters and self.stage != 3:
            raise ValueError(f"offload_parameters=True needs stage=3 (got stage={self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer=True needs a ZeRO stage of 1, 2 or 3 (got stage=0)")
        if self.pin_memory and not (self.offload_optimizer or self.offload_parameters):
            raise ValueError(
                "pin_memory=True needs offload_optimizer=True or offload_parameters=True (it pins the offloaded "
                "tensors)"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.config is not None:
            changed = [
                f.name
                for f in DeepSpeedConfig.__dataclass_fields__.values()
                if f.name not in _NOT_IN_THE_CONFIG and getattr(self, f.name) != _default(f)
            ]
            if changed:
                raise ValueError(
                    f"pass either config= or the typed options, not both: {', '.join(changed)} "
                    "would be ignored; put them in the DeepSpeed config"
                )
            if not isinstance(self.config, dict):
                _check_json_file(self.config, "config", "a dict or an existing JSON file")

    def user_config(self) -> dict[str, Any]:
        """The DeepSpeed configuration before ember fills in what it knows."""
        if self.config is not None:
            if isinstance(self.config, dict):
                copied: dict[str, Any] = json.loads(json.dumps(self.config))  # a deep copy, JSON values only
                return copied
            loaded: dict[str, Any] = json.loads(Path(self.config).read_text())
            return loaded
        zero: dict[str, Any] = {
            "stage": self.stage,
            "reduce_bucket_size": self.reduce_bucket_size,
            "allgather_bucket_size": self.allgather_bucket_size,
            "overlap_comm": self.overlap_comm,
            "contiguous_gradients": self.contiguous_gradients,
            "allgather_partitions": self.allgather_partitions,
            "reduce_scatter": self.reduce_scatter,
            "sub_group_size": self.sub_group_size,
        }
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.pin_memory}
        if self.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.pin_memory}
        if self.stage == 3:
            del zero["allgather_bucket_size"]  # stage 3 names its bucket sizes differently
        config: dict[str, Any] = {"zero_optimization": zero}
        if self._fp16_options():  # "enabled" comes from the precision, in the strategy
            config["fp16"] = {name: getattr(self, name) for name in _FP16}
        checkpointing = {name: True for name in _CHECKPOINTING if getattr(self, name)}
        if checkpointing:
            config["activation_checkpointing"] = checkpointing
        return config

    def _check_precision(self, precision: Any) -> None:
        """Refuse fp16 loss-scaling options under a precision that does not run DeepSpeed's fp16 mode
        (the engine would drop them without a word)."""
        if self._fp16_options() and getattr(precision, "dtype", None) is not torch.float16:
            raise ValueError(
                f"DeepSpeedConfig({', '.join(self._fp16_options())}) set DeepSpeed's fp16 loss scaling, but "
                f"precision={precision.name!r} does not run in fp16 mode; use '16-mixed' or '16-true', or drop them"
            )

    def _fp16_options(self) -> list[str]:
        """The fp16 loss-scaling options changed from their defaults, as ``name=value``."""
        fields = DeepSpeedConfig.__dataclass_fields__
        return [f"{n}={getattr(self, n)!r}" for n in _FP16 if getattr(self, n) != fields[n].default]


_BOOLS = ("offload_optimizer", "offload_parameters", "overlap_comm", "contiguous_gradients", "allgather_partitions",
          "reduce_scatter", "pin_memory", "partition_activations", "cpu_checkpointing",
          "synchronize_checkpoint_boundary")  # fmt: skip
_FP16 = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
_CHECKPOINTING = ("partition_activations", "cpu_checkpointing", "synchronize_checkpoint_boundary")
# Options of the strategy rather than of the DeepSpeed configuration: they go with config= too.
_NOT_IN_THE_CONFIG = (
    "config",
    "logging_level",
    "process_group_backend",
    "exclude_frozen_parameters",
    "timeout",
)


def _check_json_file(path: str | os.PathLike[str], name: str, expected: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``path`` is a readable JSON file."""
    try:
        found = Path(path).is_file()
    except (OSError, ValueError):  # e.g. a NUL byte in the name
        found = False
    if not found:
        raise ValueError(f"{name}={str(path)!r} is not {expected}")
    try:
        json.loads(Path(path).read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise ValueError(f"{name}={str(path)!r} is not valid JSON: {err}") from None


def _with_config_variable(config: DeepSpeedConfig) -> DeepSpeedConfig:
    """``config``, or where it has no ``config`` and ``PL_DEEPSPEED_CONFIG_PATH`` is set, that file as
    its ``config``: as in Lightning, the file then replaces the typed ZeRO options (a registry name's
    ``stage`` too); the options outside the DeepSpeed configuration (``timeout``, ...) are kept."""
    path = deepspeed_config_path()
    if config.config is not None or path is None:
        return config
    _check_json_file(path, f"environment variable {DEEPSPEED_CONFIG_VARIABLE}", "an existing JSON file")
    log.info("DeepSpeed config from the environment variable %s=%r", DEEPSPEED_CONFIG_VARIABLE, path)
    kept = {name: getattr(config, name) for name in _NOT_IN_THE_CONFIG if name != "config"}
    return DeepSpeedConfig(config=path, **kept)


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _fill_model_autos(config: dict[str, Any], module: Any) -> None:
    """The ``"auto"`` entries of ``zero_optimization`` that 🤗 Accelerate fills from the model: bucket
    sizes from ``model.config.hidden_size`` (the largest of ``hidden_sizes``), no 16-bit save gather."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    if zero.get("stage3_gather_16bit_weights_on_model_save") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    model_config = getattr(module, "config", None)
    hidden = getattr(model_config, "hidden_size", None)
    if hidden is None and getattr(model_config, "hidden_sizes", None):
        hidden = max(model_config.hidden_sizes)  # type: ignore[union-attr]
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        return
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


def _auto_keys(config: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the entries still ``"auto"``."""
    found = []
    for key, value in config.items():
        if isinstance(value, dict):
            found += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(f"{prefix}{key}")
    return found
