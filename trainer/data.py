"""Where the Trainer's data comes from, and how many batches each loop runs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch.utils._pytree import tree_unflatten
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from ember.trainer.combined import CombinedLoader, PreparedCombinedLoader
from ember.trainer.config import TrainerConfig, resolve_limit
from ember.trainer.hooks import overridden
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.profilers.timed import module_action, timed

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.data import PreparedDataLoader
    from ember.strategies import Strategy
    from ember.trainer.profilers import Profiler

__all__ = [
    "TrainerData",
    "batch_limit",
    "batch_transfer",
    "entry_arguments",
    "find_loaders",
    "find_train_loader",
    "loader_length",
    "unshuffled",
    "val_check_batch",
]

Transfer = Callable[[Iterable[Any]], Iterable[Any]]


def batch_transfer(
    module: TrainModule,
    strategy: Strategy,
    dataloader_idx: int,
    profiler: Profiler | None = None,
    datamodule: DataModule | None = None,
) -> Transfer | None:
    """What moves a prepared loader's batches when the module or the DataModule overrides Lightning's
    batch-transfer hooks: ``on_before_batch_transfer``, ``transfer_batch_to_device`` (else the
    strategy's transfer), ``on_after_batch_transfer``, in that order, for each batch (each timed
    under a profiler). As Lightning, the DataModule's override of a hook wins over the module's.
    None: none is overridden."""

    def hook(name: str) -> Any:
        data_hook = _datamodule_override(datamodule, name)
        method = overridden(module, name)
        if data_hook is not None:
            if method is not None:
                warnings.warn(
                    f"{name} is overridden in both the TrainModule and the DataModule: the DataModule's "
                    "runs (as in Lightning)",
                    stacklevel=5,
                )
            return timed(profiler, module_action(datamodule, name, "DataModule"), data_hook)
        return None if method is None else timed(profiler, module_action(module, name), method)

    before, transfer = hook("on_before_batch_transfer"), hook("transfer_batch_to_device")
    after = hook("on_after_batch_transfer")
    if before is None and transfer is None and after is None:
        return None
    device = strategy.root_device

    def to_device(batches: Iterable[Any]) -> Iterable[Any]:
        if before is not None:
            batches = (before(batch, dataloader_idx) for batch in batches)
        if transfer is not None:
            batches = (transfer(batch, device, dataloader_idx) for batch in batches)
        else:
            batches = strategy.batches_to_device(batches)
        if after is not None:
            batches = (after(batch, dataloader_idx) for batch in batches)
        return batches

    return to_device


def _datamodule_override(datamodule: DataModule | None, name: str) -> Callable[..., Any] | None:
    """``datamodule``'s ``name`` when it is not :class:`DataModule`'s own, else None."""
    if datamodule is None:
        return None
    method: Callable[..., Any] = getattr(datamodule, name)
    return None if getattr(method, "__func__", None) is getattr(DataModule, name) else method


def entry_arguments(
    method: str,
    module: TrainModule | None,
    model: TrainModule | None,
    loaders: Any,
    datamodule: DataModule | None,
) -> tuple[TrainModule | None, Any, DataModule | None]:
    """An entry point's arguments in Lightning's forms, as ember's: ``model=`` names the module, and
    a DataModule may come where the loaders go (``trainer.fit(module, datamodule)``)."""
    if model is not None:
        if module is not None:
            raise TypeError(f"{method}() got both module and model=, two names of one argument: pass one")
        module = model
    if isinstance(loaders, DataModule):
        if datamodule is not None:
            raise ValueError(
                f"{method}() got a DataModule in place of the dataloaders and datamodule= too: pass one"
            )
        loaders, datamodule = None, loaders
    return module, loaders, datamodule


def unshuffled(loader: DataLoader[Any]) -> DataLoader[Any]:
    """``loader`` with its ``RandomSampler`` replaced by a ``SequentialSampler`` (``overfit_batches``:
    the same first batches every epoch), with a warning; any other loader as it is."""
    if not isinstance(loader.sampler, RandomSampler) or type(loader.batch_sampler) is not BatchSampler:
        return loader
    warnings.warn(
        "overfit_batches is set and the training dataloader shuffles: it is read in order instead, so every "
        "epoch trains on the same batches",
        stacklevel=4,
    )
    extra: dict[str, Any] = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, shuffle=False, drop_last=loader.drop_last,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context, persistent_workers=loader.persistent_workers,
        **extra,
    )  # fmt: skip


def find_train_loader(
    config: TrainerConfig, module: TrainModule, given: Any, datamodule: DataModule | None
) -> DataLoader[Any] | CombinedLoader:
    """The training data of a fit: one loader, or a :class:`CombinedLoader` of several (a list or
    dict of loaders is combined in ``"max_size_cycle"`` mode, as Lightning); each loader unshuffled
    with ``overfit_batches``."""
    source = given
    if source is None and datamodule is not None:
        source = datamodule.train_dataloader()
    if source is None and callable(getattr(module, "train_dataloader", None)):
        source = module.train_dataloader()
    if source is None or (isinstance(source, (list, tuple, Mapping)) and not source):
        raise ValueError(
            "fit() needs training data: pass train_dataloaders, a datamodule, or define train_dataloader()"
        )
    combined = source if isinstance(source, CombinedLoader) else None
    if combined is None and isinstance(source, (list, tuple, Mapping)):
        combined = CombinedLoader(source, "max_size_cycle")
    loaders = combined.flattened if combined is not None else [source]
    for loader in loaders:
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"train data must be torch.utils.data.DataLoader objects, got {type(loader).__name__}"
            )
    if config.overfit_batches:
        loaders = [unshuffled(loader) for loader in loaders]
    if combined is None:
        single: DataLoader[Any] = loaders[0]
        return single
    return CombinedLoader(tree_unflatten(loaders, combined._spec), combined.mode)


def find_loaders(
    kind: str, given: Any, datamodule: DataModule | None, module: TrainModule
) -> list[DataLoader[Any]]:
    """``kind`` loaders from the call's arguments, else the DataModule, else the module's ``<kind>_dataloader()``."""
    source = given
    if source is None and datamodule is not None:
        source = getattr(datamodule, f"{kind}_dataloader")()
    if source is None and callable(getattr(module, f"{kind}_dataloader", None)):
        source = getattr(module, f"{kind}_dataloader")()
    if source is None:
        return []
    if isinstance(source, Mapping):  # Lightning's dict of loaders: dataloader_idx in the dict's order
        source = list(source.values())
    loaders = list(source) if isinstance(source, (list, tuple)) else [source]
    for loader in loaders:
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"{kind} data must be torch.utils.data.DataLoader objects, got {type(loader).__name__}"
            )
    return loaders


def val_check_batch(config: TrainerConfig, num_training_batches: int | float, has_val: bool) -> int:
    """Validate every this many training batches (``val_check_interval``: a count, or a fraction of the epoch)."""
    interval = config.val_check_interval
    if not isinstance(interval, (int, float)):  # a time: the fit's ValClock counts it, not batches
        return 2**62
    if isinstance(interval, int):
        if has_val and interval > num_training_batches and config.check_val_every_n_epoch is not None:
            raise ValueError(
                f"val_check_interval={interval} is larger than the {num_training_batches} training batches "
                "of an epoch; use a smaller int, a float fraction of the epoch such as 0.25, or "
                "check_val_every_n_epoch=None to count batches across epochs"
            )
        return interval
    if math.isinf(num_training_batches):
        if interval != 1.0 and has_val:
            raise ValueError(
                f"val_check_interval={interval}: a float is a fraction of the epoch, and this training data "
                "has no length (an iterable dataset); use 1.0 (validate at the end of each epoch), an int "
                "(validate every that many training batches) or a time such as '00:00:30:00'"
            )
        return 2**62

    return max(1, int(num_training_batches * interval))


def batch_limit(name: str, limit: int | float, loader: Any) -> int | float:
    """The batches ``limit_<stage>_batches`` (``name``) lets through of ``loader``. As Lightning, a
    fraction that cannot be taken raises: of a loader without a length, or less than one batch."""
    available = loader_length(loader)
    batches = resolve_limit(limit, available)
    if isinstance(limit, float) and 0.0 < limit < 1.0:
        if math.isinf(available):
            raise ValueError(
                f"{name}={limit} is a fraction of the batches, and this loader has no length (an iterable "
                f"dataset); use 1.0, 0.0 or an int (a number of batches)"
            )
        if batches == 0 and available > 0:
            raise ValueError(
                f"{name}={limit} of {available} batches is less than one batch; use a fraction of at least "
                f"1/{available}, or an int (a number of batches)"
            )
    return batches


def loader_length(loader: Any) -> int | float:
    """``len(loader)``, or infinity for a loader without one (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return math.inf


class TrainerData:
    """Mixed into :class:`~ember.trainer.Trainer`: its dataloaders, prepared, and their batch counts."""

    config: TrainerConfig
    accelerator: Accelerator
    num_training_batches: int | float
    num_val_batches: list[int | float]
    _val_check_batch: int
    _train_loader: PreparedDataLoader | PreparedCombinedLoader | None
    _val_loaders: list[PreparedDataLoader]
    _sources: tuple[Any, Any, DataModule | None]
    _datamodule: DataModule | None

    if TYPE_CHECKING:

        @property
        def module(self) -> TrainModule: ...

        @property
        def strategy(self) -> Strategy: ...

    def _prepare_loader(
        self,
        loader: DataLoader[Any],
        dataloader_idx: int = 0,
        evaluation: bool = False,
        predicting: bool = False,
    ) -> PreparedDataLoader:
        """``evaluation``: a validation or test loader, whose samples are dealt to the processes as
        Lightning's ``DistributedSampler`` deals them (at most ``world - 1`` of them repeated);
        ``predicting``: a predict loader, dealt unpadded as Lightning's ``UnrepeatedDistributedSampler``.
        A custom batch sampler batches each process's share. A loader whose sampler is a
        ``DistributedSampler`` already is not sharded again (as Lightning)."""
        return self.accelerator._prepare_dataloader(
            loader,
            shard=self.config.use_distributed_sampler and not isinstance(loader.sampler, DistributedSampler),
            to_device=batch_transfer(
                self.module, self.strategy, dataloader_idx, self.config.profiler, self._datamodule
            ),
            shard_samples=evaluation,
            unrepeated=predicting,
        )

    def _prepare_train(
        self, train: DataLoader[Any] | CombinedLoader
    ) -> PreparedDataLoader | PreparedCombinedLoader:
        """The training data prepared: each loader of a :class:`CombinedLoader` on its own (sharded,
        shuffled and positioned as a single loader), the module's batch-transfer hooks run on the
        combined batch (``dataloader_idx`` 0, as Lightning)."""
        if not isinstance(train, CombinedLoader):
            return self._prepare_loader(train)
        hooks = batch_transfer(self.module, self.strategy, 0, self.config.profiler, self._datamodule)
        loaders = [
            self.accelerator._prepare_dataloader(
                loader,
                shard=self.config.use_distributed_sampler
                and not isinstance(loader.sampler, DistributedSampler),
                placed=hooks is None,
            )
            for loader in train.flattened
        ]
        return PreparedCombinedLoader(train, loaders, self.accelerator._gradient_state.loop, hooks)

    def _loaders(self, kind: str, given: Any, datamodule: DataModule | None) -> list[DataLoader[Any]]:
        return find_loaders(kind, given, datamodule, self.module)

    def _reload_loaders(self) -> None:
        """``reload_dataloaders_every_n_epochs``: the training and validation loaders asked for again
        where the fit found them (the module's or DataModule's ``*_dataloader()``), and prepared."""
        train_given, val_given, datamodule = self._sources
        assert self._train_loader is not None
        old = [*_flat(self._train_loader), *self._val_loaders]
        self._train_loader = self._prepare_train(
            find_train_loader(self.config, self.module, train_given, datamodule)
        )
        val = self._loaders("val", val_given, datamodule)
        self._val_loaders = [self._prepare_loader(v, i, evaluation=True) for i, v in enumerate(val)]
        new = [*_flat(self._train_loader), *self._val_loaders]
        if len(new) != len(old):
            raise ValueError(
                f"reload_dataloaders_every_n_epochs: the reloaded data has {len(new)} training and validation "
                f"loaders, the fit started with {len(old)}; checkpoints need the same number"
            )
        self.accelerator._swap_dataloaders(old, new)
        self._set_batch_counts()

    def _set_batch_counts(self) -> None:
        assert self._train_loader is not None
        self.num_training_batches = batch_limit(
            "limit_train_batches", self.config.limit_train_batches, self._train_loader
        )
        self.num_val_batches = self._val_limits()
        self._val_check_batch = val_check_batch(
            self.config, self.num_training_batches, bool(self._val_loaders)
        )

    def _val_limits(self) -> list[int | float]:
        return [batch_limit("limit_val_batches", self.config.limit_val_batches, v) for v in self._val_loaders]

    @property
    def num_sanity_val_batches(self) -> list[int | float]:
        """The batches of each validation loader the sanity check of ``fit`` runs (Lightning's)."""
        return self._sanity_limits()

    def _sanity_limits(self) -> list[int | float]:
        steps = self.config.num_sanity_val_steps
        return [limit if steps == -1 else min(steps, limit) for limit in self._val_limits()]


def _flat(loader: PreparedDataLoader | PreparedCombinedLoader) -> list[PreparedDataLoader]:
    """The prepared loaders the accelerator holds for ``loader`` (a combined loader's own)."""
    return list(loader.loaders) if isinstance(loader, PreparedCombinedLoader) else [loader]
