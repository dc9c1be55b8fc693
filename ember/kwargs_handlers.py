"""🤗 Accelerate's ``kwargs_handlers``: small dataclasses that pass settings to the objects the
Accelerator builds, accepted under Accelerate's names so that its loops switch by import.

- :class:`DistributedDataParallelKwargs` and :class:`InitProcessGroupKwargs` build the DDP strategy's
  :class:`~ember.strategies.DDPConfig` (with ``strategy="ddp"``, or ``"auto"`` on several processes).
- :class:`GradScalerKwargs` builds the ``torch.amp.GradScaler`` of ``precision="16-mixed"``
  (``mixed_precision="fp16"``).
- :class:`ProfileKwargs` configures the ``torch.profiler.profile`` of ``accelerator.profile()``.
- :class:`AutocastKwargs` sets ``torch.autocast``'s options for the forward of every prepared model
  and for ``accelerator.autocast()`` blocks (or, given to ``accelerator.autocast(autocast_handler=...)``,
  for that block only).

A handler that does not apply to the chosen strategy or precision raises ``ValueError``: its
settings would otherwise be silently dropped. :class:`AutocastKwargs` is the exception, as in
Accelerate: where nothing autocasts, turning autocast off or its cache on has nothing to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ember._validation import check_bool

if TYPE_CHECKING:
    import torch

    from ember.precision import Precision
    from ember.strategies import Strategy

__all__ = [
    "AutocastKwargs",
    "DistributedDataParallelKwargs",
    "GradScalerKwargs",
    "InitProcessGroupKwargs",
    "ProfileKwargs",
]

# 🤗 Accelerate's spelling of the precision argument, accepted so its users can switch by import.
_ACCELERATE_PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed", "fp8": None}


def accelerate_precision(precision: Any, mixed_precision: Any) -> Any:
    """The Accelerator's ``precision`` with Accelerate's ``mixed_precision`` spelling folded in."""
    if mixed_precision is None:
        return precision
    if not isinstance(mixed_precision, str) or _ACCELERATE_PRECISION.get(mixed_precision) is None:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is not supported. Valid choices: 'no', 'fp16', 'bf16'"
        )
    if precision is not None:
        raise ValueError("pass either precision= or mixed_precision=, not both")
    return _ACCELERATE_PRECISION[mixed_precision]


@dataclass(frozen=True)
class DistributedDataParallelKwargs:
    """``DistributedDataParallel``'s options (those :class:`~ember.strategies.DDPConfig` has).

    ``comm_hook``: ``"no"``, ``"fp16"``, ``"bf16"``, ``"power_sgd"`` or ``"batched_power_sgd"``;
    ``comm_wrapper``: ``"no"``, ``"fp16"`` or ``"bf16"``, which wraps the hook; ``comm_state_option``:
    ``PowerSGDState``'s options, for the PowerSGD hooks (``DDPConfig``'s ``comm_*`` fields).
    """

    find_unused_parameters: bool = False
    broadcast_buffers: bool = True
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    comm_hook: str = "no"
    comm_wrapper: str = "no"
    comm_state_option: dict[str, Any] = field(default_factory=dict)

    def _ddp_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~ember.strategies.DDPConfig` these options are."""
        hook = getattr(self.comm_hook, "value", self.comm_hook)  # (also Accelerate's enum)
        wrapper = getattr(self.comm_wrapper, "value", self.comm_wrapper)
        options = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("comm")
        }
        options["comm_hook"] = None if hook in ("no", None) else hook
        options["comm_wrapper"] = None if wrapper in ("no", None) else wrapper
        # DDPConfig refuses a state dict for a hook that takes none, and a wrapper without a hook.
        options["comm_state"] = dict(self.comm_state_option) if self.comm_state_option else None
        return options


@dataclass(frozen=True)
class InitProcessGroupKwargs:
    """The process group's ``backend`` (None: NCCL on CUDA, gloo on CPU) and ``timeout``."""

    backend: str | None = None
    timeout: timedelta | None = None


@dataclass(frozen=True)
class GradScalerKwargs:
    """``torch.amp.GradScaler``'s options, for ``precision="16-mixed"``."""

    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True


@dataclass(frozen=True)
class AutocastKwargs:
    """``torch.autocast``'s options: in ``Accelerator(kwargs_handlers=[...])``, for the forward of every
    prepared model and ``accelerator.autocast()``'s default; in ``accelerator.autocast(autocast_handler=...)``,
    for that block. ``enabled=False`` runs in full precision (even inside an enclosing autocast);
    ``cache_enabled`` turns autocast's weight cast cache on or off (None: torch's default). They
    apply under the mixed precisions; where nothing autocasts (``32-true``, ``16-true``, DeepSpeed's
    engine, ...) they change nothing, as in 🤗 Accelerate.
    """

    enabled: bool = True
    cache_enabled: bool | None = None

    def __post_init__(self) -> None:
        check_bool("enabled", self.enabled, owner="AutocastKwargs")
        check_bool("cache_enabled", self.cache_enabled, owner="AutocastKwargs", optional=True)


_ACTIVITIES = ("cpu", "cuda", "xpu")


@dataclass(frozen=True)
class ProfileKwargs:
    """``torch.profiler.profile``'s options, for ``accelerator.profile()``.

    ``activities``: some of ``"cpu"``, ``"cuda"``, ``"xpu"`` (None: torch's default, every one
    available); ``schedule_option``: ``torch.profiler.schedule``'s arguments (``wait``, ``warmup``,
    ``active``, ``repeat``, ``skip_first``), then call ``prof.step()`` once per step;
    ``on_trace_ready``: called with the profiler at the end of each active cycle;
    ``output_trace_dir``: where each process writes its Chrome trace, ``profile_<process_index>.json``,
    when the profiled block ends (under a schedule: ``profile_<process_index>_step<N>.json`` at the
    end of each active cycle).
    """

    activities: Sequence[str] | None = None
    schedule_option: dict[str, int] | None = None
    on_trace_ready: Callable[[Any], None] | None = None
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    with_flops: bool = False
    with_modules: bool = False
    output_trace_dir: str | None = None

    def __post_init__(self) -> None:
        for activity in self.activities or ():
            if activity not in _ACTIVITIES:
                raise ValueError(
                    f"ProfileKwargs(activities=[..., {activity!r}, ...]): valid choices are "
                    + ", ".join(map(repr, _ACTIVITIES))
                )

    def build(self) -> torch.profiler.profile:
        """The profiler these options describe (not started)."""
        import torch

        kinds = torch.profiler.ProfilerActivity
        activities = None if self.activities is None else [getattr(kinds, a.upper()) for a in self.activities]
        schedule = None if self.schedule_option is None else torch.profiler.schedule(**self.schedule_option)
        return torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self.on_trace_ready,
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
            with_flops=self.with_flops,
            with_modules=self.with_modules,
        )


_KINDS = (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    GradScalerKwargs,
    AutocastKwargs,
    ProfileKwargs,
)


def check_handlers(handlers: Sequence[Any] | None) -> dict[type, Any]:
    """The handlers by kind: one of each at most, and only ember's kinds."""
    found: dict[type, Any] = {}
    for handler in handlers or ():
        if type(handler) not in _KINDS:
            raise TypeError(
                f"kwargs_handlers: {type(handler).__name__} is not supported. Valid choices: "
                + ", ".join(f"ember.{kind.__name__}" for kind in _KINDS)
            )
        if type(handler) in found:
            raise ValueError(f"kwargs_handlers: one {type(handler).__name__} at most")
        found[type(handler)] = handler
    return found


def ddp_strategy(
    handlers: dict[type, Any], strategy: str | Strategy, world_size: int, device_type: str
) -> str | Strategy:
    """``strategy``, or the DDP strategy the DDP and process-group handlers configure."""
    ddp, group = handlers.get(DistributedDataParallelKwargs), handlers.get(InitProcessGroupKwargs)
    if ddp is None and group is None:
        return strategy
    if strategy == "auto" and device_type == "xla":
        strategy = "xla"  # what "auto" means there: refused below, it is not DDP
    if strategy == "auto" and world_size == 1:
        return strategy  # one process: no DDP to configure, and no process group (as in Accelerate)
    if strategy == "ddp" or strategy == "auto":
        from ember.strategies import DDPConfig, DDPStrategy  # (imported only when DDP is configured)

        options: dict[str, Any] = ddp._ddp_options() if ddp is not None else {}
        if group is not None:
            options["process_group_backend"] = group.backend
            if group.timeout is not None:
                options["timeout"] = group.timeout
        return DDPStrategy(DDPConfig(**options))
    names = ", ".join(type(h).__name__ for h in (ddp, group) if h is not None)
    raise ValueError(
        f"kwargs_handlers: {names} configure strategy='ddp', not strategy={strategy!r}; pass the strategy's "
        "own config instead (FSDPConfig, DeepSpeedConfig, ...)"
    )


def handled_precision(handlers: dict[type, Any], plugin: Precision, device_type: str) -> Precision:
    """``plugin``, or the mixed precision that :class:`GradScalerKwargs` (its scaler) and
    :class:`AutocastKwargs` (its forward's autocast) configure."""
    import torch

    from ember.precision import MixedPrecision

    scaler, autocast = handlers.get(GradScalerKwargs), handlers.get(AutocastKwargs)
    if scaler is not None and (plugin.name != "16-mixed" or not isinstance(plugin, MixedPrecision)):
        raise ValueError(
            f"kwargs_handlers: GradScalerKwargs configure the scaler of precision='16-mixed' "
            f"(mixed_precision='fp16'), not precision={plugin.name!r}"
        )
    if not isinstance(plugin, MixedPrecision) or (scaler is None and autocast is None):
        return plugin  # (AutocastKwargs where nothing autocasts: nothing to change, as in Accelerate)
    return MixedPrecision(
        plugin.name,
        device_type=device_type,
        scaler=torch.amp.GradScaler(device_type, **dataclasses.asdict(scaler)) if scaler else plugin.scaler,
        autocast_enabled=autocast.enabled if autocast else plugin.autocast_enabled,
        cache_enabled=autocast.cache_enabled if autocast else plugin.cache_enabled,
    )
