"""``TrainModule``: the user's model plus its training recipe, driven by the Trainer."""

from __future__ import annotations

import builtins
import itertools
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ember._ops import check_shapes, tensors_of
from ember._tree import apply_to_tensors
from ember.trainer.datamodule import DataModule
from ember.trainer.hparams import AttributeDict, HyperparametersMixin
from ember.trainer.module_hooks import BatchTransferHooks, ModeHooks, StepHooks
from ember.trainer.module_tools import ModuleTools, numbers_to_tensors

if TYPE_CHECKING:
    from ember.trainer.loggers import Logger
    from ember.trainer.optim import LRSchedulerConfig
    from ember.trainer.trainer import Trainer

__all__ = ["AttributeDict", "DataModule", "TrainModule"]

_M = TypeVar("_M", bound="TrainModule")


class TrainModule(nn.Module, StepHooks, BatchTransferHooks, ModeHooks, ModuleTools, HyperparametersMixin):
    """Subclass it, define ``training_step`` and ``configure_optimizers``, hand it to ``Trainer.fit``.

    Example::

        class Classifier(TrainModule):
            def __init__(self, lr: float = 1e-3):
                super().__init__()
                self.save_hyperparameters()
                self.net = nn.Linear(64, 10)

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.cross_entropy(self.net(x), y)
                self.log("train_loss", loss, prog_bar=True)
                return loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
    """

    #: Set to False to call ``optimizer.step()`` and :meth:`manual_backward` yourself.
    automatic_optimization: bool = True
    # Properties TorchScript must not compile (to_torchscript), as in Lightning.
    __jit_unused_properties__: ClassVar[list[str]] = [
        *("trainer", "device", "dtype", "current_epoch", "global_step", "global_rank", "local_rank"),
        *("logger", "loggers", "example_input_array", "automatic_optimization", "hparams", "hparams_initial"),
        *("strict_loading", "on_gpu", "fabric", "device_mesh"),
    ]
    # (Set on an instance, TorchScript would type them from this class's annotations: strings, which fail.)
    __jit_ignored_attributes__: ClassVar[list[str]] = ["automatic_optimization", "_strict_loading"]
    _strict_loading: bool | None = None  # None: never set (load_from_checkpoint's strict may decide)

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Trainer | None = None

    # -- what the Trainer calls ------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the loss (a tensor), a dict with ``"loss"``, or ``None`` to skip the batch."""
        raise TypeError(
            f"{type(self).__name__} must define training_step(self, batch, batch_idx) to be fitted"
        )

    # (Lightning's signatures: the loop's (batch, batch_idx[, dataloader_idx]), whatever the loaders)
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward of the batch (the first argument)."""
        return self(kwargs["batch"] if "batch" in kwargs else args[0])

    def configure_optimizers(self) -> Any:
        """An optimizer; ``(optimizers, schedulers)``; or ``{"optimizer": ..., "lr_scheduler": ...}``."""
        raise TypeError(f"{type(self).__name__} must define configure_optimizers() to be fitted")

    def prepare_data(self) -> None:
        """Download or write files, at the start of each stage (after the DataModule's): on global
        rank 0 only, while the other processes wait; before :meth:`setup`."""

    def setup(self, stage: str) -> None:
        """Called at the start of fit/validate/test/predict, on every process, before configure_model."""

    def teardown(self, stage: str) -> None:
        """Called at the end of fit/validate/test/predict, on every process."""

    def configure_model(self) -> None:
        """Build layers here (instead of ``__init__``) to create them lazily, after the strategy is set up.

        Called by ``fit``, and by ``validate``/``test``/``predict`` for a module this Trainer has not
        prepared yet (as Lightning, each stage): keep it idempotent, return early when the layers exist."""

    def configure_callbacks(self) -> list[Any]:
        """Callbacks this module always wants (added to the Trainer's)."""
        return []

    # -- data (optional: the Trainer's arguments or a DataModule may provide it) -----------------
    train_dataloader: Any = None
    val_dataloader: Any = None
    test_dataloader: Any = None
    predict_dataloader: Any = None

    # -- hooks (documented order: docs/concepts/hooks.md) ------------------------------------------
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    @property
    def strict_loading(self) -> bool:
        """Whether a checkpoint's weights must match this module's exactly (True, the default) when
        ``validate``/``test``/``predict(ckpt_path=...)`` and :meth:`load_from_checkpoint` load them;
        False loads the tensors both have and warns about the others."""
        return self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    # -- the trainer's view ------------------------------------------------------------------------
    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            if self._jit_is_scripting:  # to_torchscript: TorchScript reads every attribute
                return None  # type: ignore[return-value]
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a Trainer (call trainer.fit(module) first)"
            )
        return self._trainer

    @property
    def device(self) -> torch.device:
        """The strategy's device while a stage runs; else where the module's parameters are (it may
        have been moved since, e.g. ``module.cpu()`` after a fit on a GPU)."""
        if self._trainer is not None and self._trainer._running:
            return self._trainer.accelerator.device
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's floating-point parameters (the first one's; else its buffers'; else
        ``torch.get_default_dtype()``): ``torch.bfloat16`` under ``precision="bf16-true"``, float32
        under a mixed precision. Read-only: convert with ``module.to(torch.float64)``."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    @dtype.setter
    def dtype(self, value: Any) -> None:
        raise RuntimeError(
            f"{type(self).__name__}.dtype is read-only: convert the module with .to({value!r})"
        )

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def logger(self) -> Logger | None:
        """The Trainer's first logger (``self.logger.experiment``: the backend's own object), or None."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list[Logger]:
        return self._trainer.loggers if self._trainer is not None else []

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only; while a progress bar is enabled, through its
        :meth:`~ember.callbacks.ProgressBar.print` (above the bar, not through it), as Lightning's."""
        from ember.callbacks.progress_bar import ProgressBar  # (here: the callbacks import this module)

        if self.global_rank != 0:
            return
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        if isinstance(bar, ProgressBar) and bar.is_enabled:
            bar.print(*args, **kwargs)
        else:
            builtins.print(*args, **kwargs)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Every process's tensors (nested structures too; numbers and NumPy arrays become tensors first,
        as Lightning's), stacked along a new first dimension of size ``world_size``; with one process,
        not stacked. ``group``: a ``torch.distributed`` process group (None: every process);
        ``sync_grads=True`` lets gradients flow back to each process's tensor. Tensors of different
        shapes or dtypes on the processes raise ``ValueError`` naming each one's (one small all-gather
        first, for the whole structure)."""
        trainer = self.trainer
        data = numbers_to_tensors(data, self.device)
        if trainer.world_size == 1:
            return data
        import torch.distributed as dist
        import torch.distributed.nn.functional as differentiable

        every = group if group is not None else dist.group.WORLD

        def stacked(tensor: torch.Tensor) -> torch.Tensor:
            if not sync_grads and group is None:
                return trainer.strategy.all_gather(tensor)
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(every))]
            dist.all_gather(parts, tensor.contiguous(), group=every)
            return torch.stack(parts)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            if sync_grads:
                return torch.stack(differentiable.all_gather(tensor.contiguous(), group=every))
            return stacked(tensor)

        # One small all-gather checks the whole structure: else gloo aborts, or the result is garbage.
        check_shapes(tensors_of(data), stacked, self.device, "all_gather()")
        return apply_to_tensors(data, gather)

    # -- logging -----------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Record a metric: a number, a scalar tensor or a torchmetrics ``Metric``.

        Defaults follow the hook it is called from: per step in ``training_step``, per epoch in
        validation/test steps and in epoch-end hooks. Epoch values are averaged weighted by batch size.
        With several evaluation loaders a name gets ``/dataloader_idx_N`` unless
        ``add_dataloader_idx=False`` (the names must then differ by loader). ``rank_zero_only=True``
        says only global rank 0 makes this call: it may not ask for ``sync_dist``, which would wait
        for the other processes (ember never synchronises a value without it). ``sync_dist_group``:
        the ``torch.distributed`` process group ``sync_dist`` reduces within (None: every process;
        ignored without ``sync_dist``). ``enable_graph`` is accepted as in Lightning, where it
        changes nothing either: the values recorded never hold the autograd graph. The arguments
        come in Lightning's order, ``logger=None`` is ``True``, and ``metric_attribute`` is accepted
        and unused (ember keeps the ``Metric`` object it is given, Lightning looks for its attribute).
        """
        logger = True if logger is None else logger
        trainer = self._trainer if self._trainer is not None else self.trainer  # (the property raises)
        if trainer.barebones:
            if trainer.is_global_zero:  # (Python shows a warning once per place that logs)
                warnings.warn(
                    f"self.log({name!r}, ...) does nothing under Trainer(barebones=True): logging costs step time",
                    stacklevel=2,
                )
            return
        if rank_zero_only and sync_dist:
            raise ValueError(
                f"self.log({name!r}, rank_zero_only=True, sync_dist=True): a value logged on rank 0 only cannot "
                "be synchronised across processes (the others never log it); drop one of the two"
            )
        store = trainer._metrics
        if add_dataloader_idx or not store.dataloader_suffix:
            store.log(name, value, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx, batch_size, sync_dist_group)  # fmt: skip
            return
        suffix, store.dataloader_suffix = store.dataloader_suffix, ""
        # (the stage's results put it under that loader only; its epoch value too, when forked)
        store.loader_of[name] = store.loader_of[f"{name}_epoch"] = suffix
        try:
            store.log(name, value, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx, batch_size, sync_dist_group)  # fmt: skip
        finally:
            store.dataloader_suffix = suffix

    def log_dict(
        self,
        dictionary: Mapping[str, Any],
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """:meth:`log` each item of ``dictionary`` with the same options (in Lightning's order)."""
        for name, value in dictionary.items():
            self.log(
                name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, enable_graph, sync_dist,
                sync_dist_group, add_dataloader_idx, batch_size, rank_zero_only=rank_zero_only,
            )  # fmt: skip

    # -- optimizers (manual optimisation) ------------------------------------------------------------
    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """The prepared optimizer (or the list, when there are several); ``use_pl_optimizer=False``:
        the optimizers ``configure_optimizers()`` returned, unwrapped (as Lightning's)."""
        trainer = self.trainer
        optimizers = trainer._step_optimizers if use_pl_optimizer else trainer.optimizers
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def lr_schedulers(self) -> Any:
        """The LR scheduler (or the list, or None)."""
        configs: list[LRSchedulerConfig] = self.trainer.lr_scheduler_configs
        if not configs:
            return None
        return configs[0].scheduler if len(configs) == 1 else [c.scheduler for c in configs]

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward(*args, **kwargs)`` through the strategy and precision plugin, for manual
        optimisation (``args`` and ``kwargs`` reach :meth:`backward` where the module overrides it)."""
        if self.automatic_optimization:  # (the Trainer would run a second backward of the returned loss)
            raise RuntimeError(
                f"manual_backward() needs manual optimization: set {type(self).__name__}.automatic_optimization = "
                "False, or return the loss from training_step and let the Trainer run the backward pass"
            )
        self.trainer._backward(loss, *args, **kwargs)

    # -- hyper-parameters (save_hyperparameters, hparams, hparams_initial: HyperparametersMixin) ------
    @classmethod
    def load_from_checkpoint(
        cls: type[_M],
        checkpoint_path: str | os.PathLike[str],
        map_location: str | torch.device | None = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> _M:
        """A new module from a Trainer checkpoint directory (or a Lightning ``.ckpt`` file, read with
        ``torch.load(weights_only=True)``): ``cls(**hyper-parameters)``, as
        :meth:`save_hyperparameters` saved them (those of one dict, Namespace or dataclass argument
        passed back as that argument; ``hparams_file``, a ``.yaml`` or ``.json`` file, replaces them;
        ``kwargs`` override or add), then :meth:`on_load_checkpoint` and the checkpoint's weights,
        whatever the strategy that wrote them (DDP, FSDP's shards, DeepSpeed). Pickle-free, whatever
        ``weights_only`` (Lightning's ``torch.load`` option); on the CPU unless ``map_location``.
        ``strict``: None follows :attr:`strict_loading`."""
        from ember.trainer.checkpointing import load_module  # (it imports this module)

        return load_module(cls, checkpoint_path, map_location, strict, kwargs, hparams_file)  # type: ignore[return-value]
