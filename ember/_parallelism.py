"""🤗 Accelerate's names for what ember has not: composable parallelism (a ``ParallelismConfig`` with
tensor, context, pipeline or sequence parallelism), FP8 and the LOMO optimizers.

Those that describe the run answer as Accelerate's do when none of it is configured, so a script
that reads them unconditionally runs as it did; those that need the missing feature raise
``RuntimeError`` (as Accelerate's) naming ember's way instead, and
the constructor arguments for them raise ``TypeError`` (:func:`refuse_accelerate_only`).
Mixed into :class:`~ember.Accelerator`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ember._validation import show

__all__ = ["ParallelismMixin", "refuse_accelerate_only"]

_ONLY_DATA_PARALLEL = (
    "every ember process is a data-parallel rank (DDP, FSDP, DeepSpeed): use accelerator.process_index "
    "(and accelerator.num_processes)"
)

_NO_CONFIG = "parallelism_config (Accelerate raises here too without one)"


def _refuse(name: str, what: str) -> RuntimeError:
    return RuntimeError(f"accelerator.{name}: ember has no {what}; {_ONLY_DATA_PARALLEL}")


# Accelerate's constructor arguments for what ember has not, and what to use instead.
_INSTEAD = {
    "megatron_lm_plugin": "ember has no Megatron-LM integration; shard a large model with strategy='fsdp' "
    "or strategy='deepspeed_stage_3'",
    "torch_tp_plugin": "ember has no tensor parallelism; shard the model with strategy='fsdp' instead",
    "parallelism_config": "ember has no composable parallelism (tensor, context, pipeline); data parallelism "
    "is strategy='ddp', sharded data parallelism strategy='fsdp'",
    "deepspeed_plugins": "ember runs one DeepSpeed engine per Accelerator: pass one plugin as "
    "deepspeed_plugin=DeepSpeedPlugin(...)",
    "split_batches": "pass dataloader_config=DataLoaderConfiguration(split_batches=True) (Accelerate ignores "
    "this argument)",
}


def refuse_accelerate_only(**given: Any) -> None:
    """``TypeError`` for the first of Accelerate's constructor arguments above that is set
    (``split_batches=False``, the default behaviour, is accepted)."""
    for name, value in given.items():
        if value is not None and not (name == "split_batches" and value is False):
            raise TypeError(f"Accelerator({name}={show(value)}): {_INSTEAD[name]}")


class ParallelismMixin:
    """Accelerate's composable-parallelism, FP8 and LOMO attributes of the Accelerator."""

    if TYPE_CHECKING:  # the Accelerator's other mixins' (AccelerateStateMixin, ProcessMixin)

        @property
        def is_fsdp2(self) -> bool: ...

        @property
        def is_local_main_process(self) -> bool: ...

    @property
    def parallelism_config(self) -> None:
        """Always None: ember has no ``ParallelismConfig`` (the constructor refuses the argument)."""
        return None

    @property
    def torch_device_mesh(self) -> None:
        """None, as Accelerate's without a ``parallelism_config``."""
        return None

    @property
    def is_composable_parallelism_enabled(self) -> bool:
        """Whether the strategy is FSDP (FSDP2), as in Accelerate."""
        return self.is_fsdp2

    @property
    def should_save_model(self) -> bool:
        """``is_local_main_process``, as Accelerate's without a ``parallelism_config``. Call
        ``save_model`` itself on every process: it writes on the main process only."""
        return self.is_local_main_process

    @property
    def fp8_backend(self) -> str:
        """``"NO"``: ember does not train in FP8 (it equals Accelerate's ``FP8BackendType.NO``)."""
        return "NO"

    @property
    def tensor_parallel_rank(self) -> int:
        raise _refuse("tensor_parallel_rank", "tensor parallelism")

    @property
    def context_parallel_rank(self) -> int:
        raise _refuse("context_parallel_rank", "context parallelism")

    @property
    def pipeline_parallel_rank(self) -> int:
        raise _refuse("pipeline_parallel_rank", "pipeline parallelism")

    @property
    def data_parallel_rank(self) -> int:
        raise _refuse("data_parallel_rank", _NO_CONFIG)

    @property
    def data_parallel_shard_rank(self) -> int:
        raise _refuse("data_parallel_shard_rank", _NO_CONFIG)

    @contextmanager
    def maybe_context_parallel(
        self,
        buffers: list[torch.Tensor] | None = None,
        buffer_seq_dims: list[int] | None = None,
        no_restore_buffers: set[torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Does nothing, as Accelerate's without context parallelism (which ember has not): the
        buffers stay whole. Warns."""
        warnings.warn(
            "maybe_context_parallel(): ember has no context parallelism, so the buffers are not sharded; "
            "the block runs as it is",
            stacklevel=3,
        )
        yield

    def deepspeed_ulysses_dl_adapter(self, dl: Any, model: Any) -> Any:
        """Returns ``dl``, as Accelerate's without sequence parallelism (which ember has not)."""
        return dl

    def lomo_backward(self, loss: torch.Tensor, learning_rate: float) -> None:
        raise RuntimeError(
            "lomo_backward(): ember has no LOMO optimizer integration (lomo_optim's fused backward); "
            "prepare a torch.optim optimizer and call accelerator.backward(loss), then optimizer.step()"
        )
