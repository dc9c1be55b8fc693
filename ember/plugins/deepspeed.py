"""🤗 Accelerate's ``DeepSpeedPlugin``, translated into ember's DeepSpeed strategy and its config."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember._validation import check_int, show
from ember.plugins._checks import offload, only, refuse

if TYPE_CHECKING:
    from ember.strategies import DeepSpeedStrategy

__all__ = ["DeepSpeedPlugin"]


# The fields hf_ds_config may give instead (where; which of its values describe the run as it is)
_GIVEN_BY_CONFIG: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "gradient_accumulation_steps": ("gradient_accumulation_steps",
                                    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "gradient_clipping": ("gradient_clipping",
                          lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    "offload_optimizer_device": ("zero_optimization.offload_optimizer.device", lambda v: v in ("none", "cpu")),
    "offload_param_device": ("zero_optimization.offload_param.device", lambda v: v in ("none", "cpu")),
    "zero3_save_16bit_model": ("zero_optimization.stage3_gather_16bit_weights_on_model_save",
                               lambda v: isinstance(v, bool)),
}  # fmt: skip


@dataclass
class DeepSpeedPlugin:
    """DeepSpeed ZeRO settings (🤗 Accelerate's fields). ``hf_ds_config``: a DeepSpeed configuration
    dict or the path of its JSON file; the other fields fill its ``"auto"`` (or missing) entries and
    must not contradict it; its ``fp16`` / ``bf16`` block, if enabled, is the precision when the
    Accelerator is given none (as in Accelerate). Without it: ``zero_stage`` (default 2),
    ``offload_optimizer_device`` / ``offload_param_device`` (``"none"`` or ``"cpu"``),
    ``gradient_clipping`` (as in Accelerate, an unset or ``"auto"`` value clips at 1.0).
    ``gradient_accumulation_steps`` (or the config's) is the run's: it wins over the Accelerator's,
    with a warning when they differ, as in Accelerate. As in Accelerate, a field left unset takes
    ``hf_ds_config``'s value (``zero_stage``, ``gradient_accumulation_steps``, ``gradient_clipping``,
    the offload devices, ``zero3_save_16bit_model``), unless that is ``"auto"``.
    ``zero3_save_16bit_model`` is written as ``zero_optimization.stage3_gather_16bit_weights_on_model_save``
    (ember's ``save_model`` gathers ZeRO-3 weights either way).
    """

    hf_ds_config: Any = None
    gradient_accumulation_steps: int | str | None = None
    gradient_clipping: float | str | None = None
    zero_stage: int | None = None
    is_train_batch_min: bool = True
    offload_optimizer_device: str | None = None
    offload_param_device: str | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool | None = None
    zero3_save_16bit_model: bool | None = None
    transformer_moe_cls_names: str | None = None
    enable_msamp: bool | None = None
    msamp_opt_level: str | None = None
    # What the run uses, when accelerator.state hands the plugin out (the final one after prepare)
    _in_use: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strategy, _ = self.strategy()  # every field is judged now, not when the Accelerator is made
        if self.zero_stage is None:  # filled, as Accelerate's: the stage the configuration runs
            stage = strategy.config.user_config().get("zero_optimization", {}).get("stage", 0)
            self.zero_stage = stage if isinstance(stage, int) else None
        if self.hf_ds_config is not None:  # likewise the fields left unset that hf_ds_config gives
            given = self._given_config()
            for name, (path, valid) in _GIVEN_BY_CONFIG.items():
                value: Any = given
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if getattr(self, name) is None and valid(value):
                    setattr(self, name, value)

    def strategy(self) -> tuple[DeepSpeedStrategy, int | None]:
        """The DeepSpeed strategy these fields describe, and the accumulation steps its configuration
        fixes (None: ``"auto"``, the Accelerator's)."""
        from ember.strategies import DeepSpeedConfig, DeepSpeedStrategy

        name = "DeepSpeedPlugin"
        only(name, "is_train_batch_min", self.is_train_batch_min, (True,),
              "ember sizes DeepSpeed's micro batch from the first prepared dataloader")  # fmt: skip
        for nvme in ("offload_optimizer_nvme_path", "offload_param_nvme_path"):
            only(name, nvme, getattr(self, nvme), (None, "none"), "ember offloads to the CPU only")
        only(name, "zero3_init_flag", self.zero3_init_flag, (None, False),
              "ember does not build models under deepspeed.zero.Init")  # fmt: skip
        only(name, "zero3_save_16bit_model", self.zero3_save_16bit_model, (None, False, True), "not a bool")
        only(name, "transformer_moe_cls_names", self.transformer_moe_cls_names, (None,),
              "ember does not configure DeepSpeed mixture-of-experts layers")  # fmt: skip
        for fp8 in ("enable_msamp", "msamp_opt_level"):
            only(name, fp8, getattr(self, fp8), (None, False) if fp8 == "enable_msamp" else (None,),
                  "ember has no FP8 (MS-AMP) precision")  # fmt: skip
        only(name, "zero_stage", self.zero_stage, (None, 0, 1, 2, 3), "not a ZeRO stage")
        steps = self.gradient_accumulation_steps
        if steps is not None and steps != "auto":
            check_int("gradient_accumulation_steps", steps, minimum=1, owner=name)
        clip = self.gradient_clipping
        if clip is not None and clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                                    or clip < 0):  # fmt: skip
            raise refuse(name, "gradient_clipping", clip, "None, 'auto' or a number >= 0", "not a norm")
        offload_optimizer = offload(name, "offload_optimizer_device", self.offload_optimizer_device)
        offload_parameters = offload(name, "offload_param_device", self.offload_param_device)
        try:
            if self.hf_ds_config is None:
                stage = 2 if self.zero_stage is None else self.zero_stage
                typed = DeepSpeedConfig(
                    stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters
                )
                config = typed.user_config()
                config["gradient_clipping"] = 1.0 if clip is None or clip == "auto" else float(clip)
                if self.zero3_save_16bit_model is not None:
                    zero = config["zero_optimization"]
                    zero["stage3_gather_16bit_weights_on_model_save"] = self.zero3_save_16bit_model
                fixed = steps if isinstance(steps, int) else None
            else:
                config = self._merged_config(offload_optimizer, offload_parameters)
                given = config["gradient_accumulation_steps"]
                fixed = None if given == "auto" else given
            return DeepSpeedStrategy(DeepSpeedConfig(config=config)), fixed
        except (TypeError, ValueError) as err:
            if str(err).startswith(name):
                raise
            raise type(err)(f"{name}: {err}") from None

    @property
    def deepspeed_config(self) -> ReadOnlyConfig:
        """The DeepSpeed configuration these fields make (Accelerate's attribute); from
        ``accelerator.state.deepspeed_plugin``, the run's (after ``prepare``, with what ember filled in:
        micro batch size, precision blocks). Read-only: ember builds the engine from the Accelerator's
        settings, so a change here would be lost."""
        return ReadOnlyConfig(self._in_use or self.strategy()[0].config.user_config())

    def precision(self) -> str | None:
        """The precision ``hf_ds_config`` enables (its ``fp16`` / ``bf16`` block's ``enabled: true``),
        else None (the Accelerator's): as in Accelerate, the config's mode is the run's when the
        Accelerator is given no precision."""
        if self.hf_ds_config is None:
            return None
        config = self._given_config()
        for block, name in (("fp16", "16-mixed"), ("bf16", "bf16-mixed")):
            settings = config.get(block)
            if isinstance(settings, dict) and settings.get("enabled") is True:
                return name
        return None

    def _merged_config(self, offload_optimizer: bool, offload_parameters: bool) -> dict[str, Any]:
        config = self._given_config()
        devices = {False: "none", True: "cpu"}
        fields: dict[str, tuple[str, Any]] = {
            "zero_stage": ("zero_optimization.stage", self.zero_stage),
            "offload_optimizer_device": ("zero_optimization.offload_optimizer.device",
                                         None if self.offload_optimizer_device is None else devices[offload_optimizer]),
            "offload_param_device": ("zero_optimization.offload_param.device",
                                     None if self.offload_param_device is None else devices[offload_parameters]),
            "gradient_accumulation_steps": ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            "gradient_clipping": ("gradient_clipping", self.gradient_clipping),
            "zero3_save_16bit_model": ("zero_optimization.stage3_gather_16bit_weights_on_model_save",
                                       self.zero3_save_16bit_model),
        }  # fmt: skip
        for field_name, (path, value) in fields.items():
            if value is None or value == "auto":
                continue
            *parents, key = path.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            current = node.get(key, "auto")
            if current != "auto" and current != value:
                raise ValueError(
                    f"DeepSpeedPlugin({field_name}={value!r}) contradicts hf_ds_config's {path}={current!r}; "
                    "give the value in one place"
                )
            node[key] = value
        # An "auto" left unfilled takes the unset field's default, as in Accelerate: DeepSpeed itself
        # reads a stage of "auto" as 0 (no ZeRO at all) without a word.
        zero = config.get("zero_optimization")
        if isinstance(zero, dict):
            if zero.get("stage") == "auto":
                zero["stage"] = 2
            for block in ("offload_optimizer", "offload_param"):
                if isinstance(zero.get(block), dict) and zero[block].get("device") == "auto":
                    zero[block]["device"] = "none"
        config.setdefault(
            "gradient_accumulation_steps", 1
        )  # as in Accelerate: a config without it accumulates 1
        if config.get("gradient_clipping") == "auto":
            config["gradient_clipping"] = 1.0  # Accelerate's value for "auto"
        return config

    def _given_config(self) -> dict[str, Any]:
        """A copy of ``hf_ds_config``, read from its file if it names one."""
        source = self.hf_ds_config
        if isinstance(source, dict):
            config: dict[str, Any] = json.loads(json.dumps(source))
        elif isinstance(source, (str, os.PathLike)):
            try:
                config = json.loads(Path(source).read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"hf_ds_config={str(source)!r} is not a readable JSON file: {err}") from None
        else:
            raise TypeError(
                f"hf_ds_config={show(source)} must be a DeepSpeed config dict or the path of its JSON file"
            )
        return config


class ReadOnlyConfig(Mapping[str, Any]):
    """A DeepSpeed configuration to read (nested blocks too); assigning raises, naming the way that works."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config

    def __getitem__(self, key: str) -> Any:
        value = self._config[key]
        return ReadOnlyConfig(value) if isinstance(value, dict) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def __len__(self) -> int:
        return len(self._config)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(
            f"deepspeed_config[{key!r}] = {show(value)}: ember's DeepSpeed configuration is read-only once the "
            "Accelerator is made (it sizes train_micro_batch_size_per_gpu from the first prepared dataloader); "
            "put the entry in DeepSpeedPlugin(hf_ds_config={...}) or DeepSpeedConfig(config={...})"
        )

    def __repr__(self) -> str:
        return repr(self._config)
