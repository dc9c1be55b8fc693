"""The Accelerator's 🤗 Accelerate plugin arguments (``deepspeed_plugin``, ``fsdp_plugin``,
``gradient_accumulation_plugin``, ``dynamo_backend`` / ``dynamo_plugin``, ``rng_types``), turned
into what ember configures otherwise — a strategy, a precision, accumulation settings — before the
strategy is resolved; and the two things they add to ``prepare``: compiling models and
synchronising RNGs at the start of each dataloader pass."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember._wrappers import GradientState
from ember.plugins import GradientAccumulationPlugin, TorchDynamoPlugin
from ember.precision.base import precision_name
from ember.strategies.capabilities import OwnsOptimizerStep

if TYPE_CHECKING:
    from ember.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from ember.strategies import Strategy

__all__ = ["PluginChoice", "resolve_plugins", "uncompiled"]

# "generator": the sampler's shuffle generator, which ember seeds alike on every process already.
_RNG_TYPES = ("generator", "torch", "cuda")
_RNG_REFUSED = {
    "xla": "ember does not synchronise the XLA generator; seed every process alike (seed=...)",
}


@dataclass(slots=True)
class PluginChoice:
    """What the plugin arguments decide."""

    strategy: Any
    precision: Any
    steps: int  # gradient accumulation
    sync_with_dataloader: bool = True
    sync_each_batch: bool = False
    compile_kwargs: dict[str, Any] | None = None
    rng_types: tuple[str, ...] = ("generator",)
    # the plugins given (dynamo_backend= as a TorchDynamoPlugin), for accelerator.state to show
    deepspeed_plugin: DeepSpeedPlugin | None = None
    fsdp_plugin: FullyShardedDataParallelPlugin | None = None
    dynamo_plugin: TorchDynamoPlugin | None = None

    def check(self, strategy: Strategy, device_type: str) -> None:
        """Judge what needs the resolved strategy and device (before any process starts)."""
        if "cuda" in self.rng_types and device_type != "cuda":
            raise ValueError(
                f"rng_types=[..., 'cuda', ...]: this run's device is {device_type!r}, which has no CUDA generator "
                "to synchronise. Valid choices here: 'generator', 'torch'"
            )

    def gradient_state(self) -> GradientState:
        return GradientState(self.steps, self.sync_with_dataloader, self.sync_each_batch)

    def compiled(self, model: nn.Module, strategy: Strategy) -> nn.Module:
        """``model`` compiled with ``torch.compile`` (last, around the strategy's wrapper, as in
        🤗 Accelerate; an engine's module in place, by the engine), or as it is."""
        if self.compile_kwargs is None or _is_compiled(model):
            return model
        if isinstance(strategy, OwnsOptimizerStep):
            strategy.compile_engine(model, self.compile_kwargs)
            return model
        result: nn.Module = torch.compile(model, **self.compile_kwargs)  # type: ignore[assignment]
        return result

    def synced(
        self, move: Callable[[Iterable[Any]], Iterable[Any]] | None, strategy: Strategy
    ) -> Callable[[Iterable[Any]], Iterable[Any]] | None:
        """``move`` (a loader's per-pass batch transfer; None: none), which first makes the listed
        generators of every process take rank 0's state: it runs once at the start of each pass,
        before the first batch is made."""
        kinds = [kind for kind in self.rng_types if kind != "generator"]
        if not kinds:
            return move

        def sync_then_move(batches: Iterable[Any]) -> Iterable[Any]:
            for kind in kinds:
                if kind == "torch":
                    torch.set_rng_state(strategy.broadcast(torch.get_rng_state(), 0).cpu())
                else:
                    torch.cuda.set_rng_state(strategy.broadcast(torch.cuda.get_rng_state(), 0).cpu())
            return move(batches) if move is not None else batches

        return sync_then_move


def resolve_plugins(
    *,
    strategy: Any,
    precision: Any,
    gradient_accumulation_steps: int,
    deepspeed_plugin: Any,
    fsdp_plugin: Any,
    gradient_accumulation_plugin: Any,
    dynamo_backend: Any,
    dynamo_plugin: Any,
    rng_types: Any,
) -> PluginChoice:
    """The strategy, precision and accumulation the plugin arguments ask for, conflicts refused."""
    if deepspeed_plugin is not None or fsdp_plugin is not None:  # (their modules load on first use)
        from ember.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin

        _check_type("deepspeed_plugin", deepspeed_plugin, DeepSpeedPlugin)
        _check_type("fsdp_plugin", fsdp_plugin, FullyShardedDataParallelPlugin)
    _check_type("gradient_accumulation_plugin", gradient_accumulation_plugin, GradientAccumulationPlugin)
    _check_type("dynamo_plugin", dynamo_plugin, TorchDynamoPlugin)
    choice = PluginChoice(strategy, precision, gradient_accumulation_steps)
    choice.deepspeed_plugin, choice.fsdp_plugin = deepspeed_plugin, fsdp_plugin
    if gradient_accumulation_plugin is not None:
        if gradient_accumulation_steps != 1:  # as in Accelerate
            raise ValueError(
                "pass either gradient_accumulation_steps= or gradient_accumulation_plugin=, not both: the plugin's "
                "num_steps is the accumulation"
            )
        choice.steps = gradient_accumulation_plugin.num_steps
        choice.sync_with_dataloader = gradient_accumulation_plugin.sync_with_dataloader
        choice.sync_each_batch = gradient_accumulation_plugin.sync_each_batch
    if deepspeed_plugin is not None and fsdp_plugin is not None:
        raise ValueError("pass either deepspeed_plugin= or fsdp_plugin=, not both: each chooses the strategy")
    if deepspeed_plugin is not None:
        choice.strategy, fixed = _plugin_strategy("deepspeed_plugin", deepspeed_plugin, strategy, "deepspeed")
        if fixed is not None and fixed != choice.steps:
            if choice.steps != 1 or gradient_accumulation_plugin is not None:  # the user asked
                warnings.warn(
                    f"gradient accumulation: the Accelerator was given {choice.steps} steps, the "
                    f"DeepSpeed config {fixed}; using DeepSpeed's, as 🤗 Accelerate does",
                    stacklevel=3,
                )
            choice.steps = fixed
        implied = deepspeed_plugin.precision()
        # (a precision given is checked against the config's fp16 / bf16 blocks by the strategy)
        if precision is None and implied is not None:
            choice.precision = implied
    if fsdp_plugin is not None:
        choice.strategy, implied = _plugin_strategy("fsdp_plugin", fsdp_plugin, strategy, "fsdp")
        if implied is not None:
            # compared by name: precision="bf16", 16 or a plugin instance may say the same as the policy
            if precision is not None and precision_name(precision) != implied:
                raise ValueError(
                    f"fsdp_plugin: mixed_precision_policy={fsdp_plugin.mixed_precision_policy!r} means "
                    f"precision={implied!r}, but precision={precision!r} was given; give it in one place"
                )
            if precision is None:  # a given one agrees: kept as given (a Precision instance stays itself)
                choice.precision = implied
    if dynamo_backend is not None and dynamo_plugin is not None:
        raise ValueError("pass either dynamo_backend= or dynamo_plugin=, not both")
    if dynamo_backend is not None:
        try:
            dynamo_plugin = TorchDynamoPlugin(backend=dynamo_backend)
        except ValueError as err:
            raise ValueError(f"dynamo_backend={dynamo_backend!r}: {err}") from None
    if dynamo_plugin is not None:
        choice.compile_kwargs = dynamo_plugin.compile_kwargs()
        choice.dynamo_plugin = dynamo_plugin
    if rng_types is not None:
        choice.rng_types = _check_rng_types(rng_types)
    return choice


def _check_type(name: str, value: Any, kind: type) -> None:
    if value is not None and not isinstance(value, kind):
        raise TypeError(
            f"{name}={type(value).__module__}.{type(value).__name__}(...): expected ember.{kind.__name__} (the same "
            "fields as 🤗 Accelerate's) or None"
        )


def _plugin_strategy(name: str, plugin: Any, strategy: Any, kind: str) -> tuple[Any, Any]:
    """The plugin's (strategy, extra); ``strategy=`` may only be left unset, "auto" or ``kind``."""
    if strategy is not None and strategy not in ("auto", kind):
        shown = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(
            f"{name} chooses the {kind!r} strategy and its config, but strategy={shown!r} was given too; "
            f"pass one of them (strategy= may be left unset, 'auto' or {kind!r} with {name})"
        )
    resolved: tuple[Any, Any] = plugin.strategy()
    return resolved


def _check_rng_types(rng_types: Any) -> tuple[str, ...]:
    if not isinstance(rng_types, (list, tuple)):
        raise TypeError(
            f"rng_types={rng_types!r} must be a list of generator names, e.g. ['generator', 'torch']"
        )
    names = []
    for kind in rng_types:
        kind = getattr(kind, "value", kind)  # Accelerate's RNGType enum
        if not isinstance(kind, str):
            raise TypeError(f"rng_types=[..., {kind!r}, ...]: each entry is a generator's name, e.g. 'torch'")
        if kind in _RNG_REFUSED:
            raise ValueError(f"rng_types=[..., {kind!r}, ...] is not supported: {_RNG_REFUSED[kind]}")
        if kind not in _RNG_TYPES:
            raise ValueError(
                f"rng_types=[..., {kind!r}, ...] is not supported. Valid choices: "
                + ", ".join(map(repr, _RNG_TYPES))
            )
        names.append(kind)
    return tuple(dict.fromkeys(names))


def _is_compiled(model: Any) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def uncompiled(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (what the strategy prepared), else ``model``."""
    return model._orig_mod if _is_compiled(model) else model


def recompiled(compiled: nn.Module, inner: nn.Module) -> nn.Module:
    """A new compiled wrapper around ``inner`` with the options of ``compiled`` (which is unchanged)."""
    eval_frame = sys.modules["torch._dynamo.eval_frame"]
    result: nn.Module = eval_frame.OptimizedModule(inner, compiled.dynamo_ctx)
    return result
