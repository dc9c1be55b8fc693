"""More of Lightning's ``Trainer`` names, each a view of what ember already holds (a mixin of
:class:`~ember.trainer.properties.TrainerProperties`): ``ckpt_path``, ``evaluating``,
``enable_validation``, ``early_stopping_callbacks``, ``num_nodes``, ``device_ids``,
``precision_plugin``, ``scaler``, ``init_module``, ``print``, ``overfit_batches``,
``reload_dataloaders_every_n_epochs``, ``enable_autolog_hparams``, ``val_check_batch`` and
``distributed_sampler_kwargs``; and (:class:`LoopViews`) ``fit_loop``, ``validate_loop``, ``test_loop``,
``predict_loop``."""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.callbacks.early_stopping import EarlyStopping
    from ember.data import PreparedDataLoader
    from ember.precision import Precision
    from ember.trainer.combined import PreparedCombinedLoader
    from ember.trainer.config import TrainerConfig
    from ember.trainer.loop_views import EvaluationLoopView, FitLoopView

__all__ = ["LightningNames", "LoopViews"]


class LightningNames:
    """Mixed into the Trainer through ``TrainerProperties``."""

    config: TrainerConfig
    accelerator: Accelerator
    callbacks: list[Any]
    sanity_checking: bool
    _val_loaders: list[PreparedDataLoader]
    _evaluation: str
    _running: str
    # The checkpoint the running (or last) stage loaded; set by fit and by _reattach, reset by _attach.
    _ckpt_path: str | None = None
    _train_loader: PreparedDataLoader | PreparedCombinedLoader | None
    _val_check_batch: int

    if TYPE_CHECKING:

        def _val_limits(self) -> list[int | float]: ...

        @property
        def num_devices(self) -> int: ...

        @property
        def local_rank(self) -> int: ...

        @property
        def global_rank(self) -> int: ...

        @property
        def world_size(self) -> int: ...

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint directory the running (or last) ``fit``, ``validate``, ``test`` or
        ``predict`` loaded (``ckpt_path="best"`` or ``"last"`` resolved, or the one ``auto_resume``
        chose); None when it loaded none."""
        return self._ckpt_path

    @ckpt_path.setter
    def ckpt_path(self, value: Any) -> None:
        raise AttributeError(
            "trainer.ckpt_path is read-only in ember: pass the checkpoint to the stage that should load it, "
            f"trainer.fit(module, ckpt_path={value!r}) (or validate/test/predict)"
        )

    @property
    def evaluating(self) -> bool:
        """A validation (the sanity check included) or test loop is running, as Lightning's flag."""
        return bool(self._evaluation) or self._running in ("validate", "test") or self.sanity_checking

    @property
    def enable_validation(self) -> bool:
        """The fit validates: it has validation data and ``limit_val_batches`` lets some through.
        (Lightning also asks that ``validation_step`` be overridden; ember runs the validation loop
        and its hooks either way.)"""
        return any(limit > 0 for limit in self._val_limits())

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        """Every :class:`~ember.callbacks.EarlyStopping` among the callbacks."""
        from ember.callbacks.early_stopping import EarlyStopping

        return [c for c in self.callbacks if isinstance(c, EarlyStopping)]

    @property
    def num_nodes(self) -> int:
        return self.config.num_nodes

    @property
    def device_ids(self) -> list[int]:
        """The index of each device this node's processes use: the GPUs (``devices=[1, 3]`` gives
        ``[1, 3]``), else ``0 .. num_devices - 1``."""
        ids = self.accelerator.strategy.device_ids
        if ids is not None and self.accelerator.device.type == "cuda":
            return list(ids)
        return list(range(self.num_devices))

    @property
    def precision_plugin(self) -> Precision:
        """The :class:`~ember.precision.Precision` plugin (ember's ``trainer.precision`` too)."""
        return self.accelerator.precision

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The ``torch.amp.GradScaler`` under ``precision="16-mixed"``, else None."""
        return self.accelerator.scaler

    @contextmanager
    def init_module(self, empty_init: bool | None = None) -> Iterator[None]:
        """Build a module inside it directly on the device, in the precision's dtype
        (``Accelerator.init_module``). ``empty_init=True``: under FSDP, layers on the meta device,
        materialised shard by shard when the fit prepares the module; ``None`` is ``False``."""
        with self.accelerator.init_module(empty_init=bool(empty_init)):
            yield

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on each node's local rank 0 only, as Lightning's ``trainer.print``."""
        if self.local_rank == 0:
            builtins.print(*args, **kwargs)

    @property
    def overfit_batches(self) -> int | float:
        return self.config.overfit_batches

    @property
    def reload_dataloaders_every_n_epochs(self) -> int:
        return self.config.reload_dataloaders_every_n_epochs

    @property
    def enable_autolog_hparams(self) -> bool:
        return self.config.enable_autolog_hparams

    @property
    def val_check_batch(self) -> int | float | None:
        """Training batches between two validations of the running (or last) fit, as Lightning's:
        ``inf`` for training data without a length (validated at the epoch's end), None before a fit
        and under a time-based ``val_check_interval``."""
        if self._train_loader is None or self.config.val_check_time is not None:
            return None
        return math.inf if self._val_check_batch == 2**62 else self._val_check_batch

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """``num_replicas`` and ``rank`` for a ``DistributedSampler`` of your own, with several
        processes; None with one (ember's prepared loaders need no sampler: it shards them itself)."""
        if self.world_size == 1:
            return None
        return {"num_replicas": self.world_size, "rank": self.global_rank}


class LoopViews:
    """Mixed into the Trainer through ``TrainerProperties``: Lightning's loop attributes. Their
    classes (:mod:`ember.trainer.loop_views`) load on first use: a fit never reads them."""

    @property
    def fit_loop(self) -> FitLoopView:
        """Lightning's ``trainer.fit_loop``: ``max_epochs`` (assignable), ``epoch_progress``,
        ``epoch_loop.batch_progress``, ``epoch_loop.val_loop`` ... (docs/reference/trainer.md)."""
        from ember.trainer.loop_views import FitLoopView

        return FitLoopView(self)  # type: ignore[arg-type]

    @property
    def validate_loop(self) -> EvaluationLoopView:
        from ember.trainer.loop_views import EvaluationLoopView

        return EvaluationLoopView(self, "validate")  # type: ignore[arg-type]

    @property
    def test_loop(self) -> EvaluationLoopView:
        from ember.trainer.loop_views import EvaluationLoopView

        return EvaluationLoopView(self, "test")  # type: ignore[arg-type]

    @property
    def predict_loop(self) -> EvaluationLoopView:
        from ember.trainer.loop_views import EvaluationLoopView

        return EvaluationLoopView(self, "predict")  # type: ignore[arg-type]
