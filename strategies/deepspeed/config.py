"""The options of :class:`~ember.strategies.deepspeed.DeepSpeedStrategy`: typed ZeRO settings or a
DeepSpeed configuration (dict or JSON file), checked when the config is made."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ember._validation import check_bool, check_timeout, show

__all__ = ["DeepSpeedConfig"]


@dataclass(kw_only=True, slots=True, frozen=True)
class DeepSpeedConfig:
    """Options of :class:`DeepSpeedStrategy`.

    Either the typed ZeRO options below, or ``config``: a DeepSpeed configuration dict or the path
    of its JSON file (then the typed options must stay at their defaults). Values ember knows —
    ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``,
    ``gradient_clipping``, the ``fp16``/``bf16`` blocks — may be left out or ``"auto"``.
    ``offload_optimizer`` keeps optimizer state (and the update) on the CPU; ``offload_parameters``
    (stage 3) keeps the parameters there too.
    """

    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reduce_bucket_size: int = 200_000_000
    allgather_bucket_size: int = 200_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    config: dict[str, Any] | str | os.PathLike[str] | None = None
    timeout: timedelta = field(default_factory=lambda: timedelta(minutes=30))

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage={show(self.stage)} is not a ZeRO stage. Valid choices: 0, 1, 2, 3")
        for name in ("offload_optimizer", "offload_parameters", "overlap_comm", "contiguous_gradients"):
            check_bool(name, getattr(self, name), owner="DeepSpeedConfig")
        check_timeout("timeout", self.timeout, owner="DeepSpeedConfig")
        if self.config is not None and not isinstance(self.config, (dict, str, os.PathLike)):
            raise TypeError(
                f"DeepSpeedConfig(config={show(self.config)}) must be None, a dict or the path of a JSON file"
            )
        if self.offload_parameters and self.stage != 3:
            raise ValueError(f"offload_parameters=True needs stage=3 (got stage={self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer=True needs a ZeRO stage of 1, 2 or 3 (got stage=0)")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.config is not None:
            changed = [
                f.name
                for f in DeepSpeedConfig.__dataclass_fields__.values()
                if f.name not in ("config", "timeout") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ValueError(
                    f"pass either config= or the typed options, not both: {', '.join(changed)} "
                    "would be ignored; put them in the DeepSpeed config"
                )
            if not isinstance(self.config, dict):
                path = Path(self.config)
                try:
                    found = path.is_file()
                except (OSError, ValueError):  # e.g. a NUL byte in the name
                    found = False
                if not found:
                    raise ValueError(f"config={str(self.config)!r} is not a dict or an existing JSON file")
                try:
                    json.loads(path.read_text())
                except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError, unreadable
                    raise ValueError(f"config={str(self.config)!r} is not valid JSON: {err}") from None

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
        }
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        if self.stage == 3:
            del zero["allgather_bucket_size"]  # stage 3 names its bucket sizes differently
        return {"zero_optimization": zero}


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
