"""🤗 Accelerate's ``GradientAccumulationPlugin`` and ``TorchDynamoPlugin``: settings of the loop
the Accelerator runs (accumulation) and of the models it prepares (``torch.compile``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember._validation import check_bool, check_int
from ember.plugins._checks import only, refuse

__all__ = ["GradientAccumulationPlugin", "TorchDynamoPlugin"]

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class GradientAccumulationPlugin:
    """Gradient accumulation (🤗 Accelerate's fields): ``num_steps`` micro-steps per optimizer step.
    ``sync_with_dataloader=False`` carries the count across the end of a dataloader pass instead of
    stepping there; ``sync_each_batch=True`` all-reduces gradients on every micro-step (less memory
    for the unsynchronised gradients, more communication). ``adjust_scheduler`` is accepted with
    either value: as in Accelerate, a prepared scheduler advances only on real optimizer steps.
    """

    num_steps: int | None = None
    adjust_scheduler: bool = True
    sync_with_dataloader: bool = True
    sync_each_batch: bool = False

    def __post_init__(self) -> None:
        name = "GradientAccumulationPlugin"
        if self.num_steps is None:
            raise ValueError(f"{name}(num_steps=None): give the micro-steps per optimizer step, an int >= 1")
        check_int("num_steps", self.num_steps, minimum=1, owner=name)
        for option in ("adjust_scheduler", "sync_with_dataloader", "sync_each_batch"):
            check_bool(option, getattr(self, option), owner=name)


# --------------------------------------------------------------------------------------------------
@dataclass
class TorchDynamoPlugin:
    """``torch.compile``'s options for the models ``prepare`` returns (🤗 Accelerate's fields):
    ``backend`` (any name of ``torch._dynamo.list_backends()``, case-insensitive; ``"no"`` or None: no
    compilation), ``mode``, ``fullgraph``, ``dynamic``, ``options``, ``disable``. Fields left at None
    take torch's defaults."""

    backend: str | None = None
    mode: str | None = None
    fullgraph: bool | None = None
    dynamic: bool | None = None
    options: dict[str, Any] | None = None
    disable: bool = False
    use_regional_compilation: bool | None = None

    def __post_init__(self) -> None:
        self.compile_kwargs()

    def compile_kwargs(self) -> dict[str, Any] | None:
        """``torch.compile``'s keyword arguments, or None when nothing is compiled."""
        name = "TorchDynamoPlugin"
        only(name, "use_regional_compilation", self.use_regional_compilation, (None, False),
             "ember compiles each prepared model whole")  # fmt: skip
        only(name, "mode", self.mode, (None, *_MODES), "not a torch.compile mode")
        for option in ("fullgraph", "dynamic"):
            check_bool(option, getattr(self, option), owner=name, optional=True)
        check_bool("disable", self.disable, owner=name)
        if self.options is not None and not isinstance(self.options, dict):
            raise refuse(name, "options", self.options, "None or a dict", "torch.compile takes a dict")
        if self.options and self.mode is not None:  # (torch.compile would refuse it only in prepare)
            raise refuse(name, "mode", self.mode, "None", "torch.compile takes mode or options, not both")
        backend = getattr(self.backend, "value", self.backend)  # Accelerate's DynamoBackend enum
        if backend is None or (isinstance(backend, str) and backend.lower() == "no"):
            return None
        import torch._dynamo

        known = sorted(torch._dynamo.list_backends(exclude_tags=()))
        if not isinstance(backend, str) or backend.lower() not in known:
            why = "not a name" if not isinstance(backend, str) else "torch has no such backend"
            raise refuse(name, "backend", self.backend, ", ".join(map(repr, ["no", *known])), why)
        backend = backend.lower()
        kwargs = {"backend": backend, "mode": self.mode, "fullgraph": self.fullgraph, "dynamic": self.dynamic,
                  "options": self.options, "disable": self.disable}  # fmt: skip
        return {k: v for k, v in kwargs.items() if v is not None}
