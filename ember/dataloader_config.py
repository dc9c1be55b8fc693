"""``DataLoaderConfiguration``: how an Accelerator prepares dataloaders (🤗 Accelerate's class).

``Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))`` makes the batch size
of every prepared dataloader the *global* batch size: each step, every process takes its slice of
one batch. See docs/concepts/data.md.
"""

from __future__ import annotations

import dataclasses

from ember._validation import check_bool, check_int

__all__ = ["DataLoaderConfiguration", "check_dataloader_config"]


@dataclasses.dataclass
class DataLoaderConfiguration:
    """How ``Accelerator.prepare`` shards dataloaders, with the fields of 🤗 Accelerate's class.

    - ``split_batches``: the dataloader's ``batch_size`` is the global batch; each step, process
      ``r`` of ``n`` takes the ``r``-th of ``n`` equal slices of one batch (the batch size must be a
      multiple of ``n``). ``False`` (the default): each process takes whole batches in turn.
    - ``even_batches``: complete an incomplete last step with samples from the start of the epoch, so
      that every process runs the same number of steps (``gather_for_metrics`` drops the repeats).
    - ``data_seed``: the shuffle seed of the prepared dataloaders (each epoch's order is a function of
      ``data_seed + epoch``); ``None``: ``Accelerator(seed=...)``, else rank 0's ``torch.initial_seed()``.
    - ``use_seedable_sampler``, ``use_stateful_dataloader``: what ember's prepared loaders always do
      (they own their shuffle seed and save their position with ``save_state``); either value is
      accepted so that an Accelerate configuration runs unchanged.
    - ``non_blocking``: ember moves batches from pinned memory (``pin_memory=True``) without blocking
      whatever this says, and others with a plain copy; accepted for the same reason.
    - ``dispatch_batches``: ``None`` or ``False`` (each process loads its own batches). ``True``,
      where Accelerate's main process loads every batch and sends the slices, is not supported.
    """

    split_batches: bool = False
    even_batches: bool = True
    data_seed: int | None = None
    use_seedable_sampler: bool = True
    use_stateful_dataloader: bool = True
    non_blocking: bool = False
    dispatch_batches: bool | None = None

    def __post_init__(self) -> None:
        owner = "DataLoaderConfiguration"
        for name in (
            "split_batches",
            "even_batches",
            "use_seedable_sampler",
            "use_stateful_dataloader",
            "non_blocking",
        ):
            check_bool(name, getattr(self, name), owner=owner)
        check_int("data_seed", self.data_seed, owner=owner, minimum=0, optional=True)
        check_bool("dispatch_batches", self.dispatch_batches, owner=owner, optional=True)
        if self.dispatch_batches:
            raise ValueError(
                "DataLoaderConfiguration(dispatch_batches=True) is not supported: each process loads its own "
                "batches (an iterable dataset is read by every process, which keeps its share). "
                "Valid choices: None, False"
            )


def check_dataloader_config(
    config: DataLoaderConfiguration | None, even_batches: bool | None
) -> DataLoaderConfiguration:
    """The Accelerator's ``dataloader_config`` with its older ``even_batches`` argument folded in."""
    check_bool("even_batches", even_batches, optional=True)
    if config is None:
        return DataLoaderConfiguration(even_batches=True if even_batches is None else even_batches)
    if not isinstance(config, DataLoaderConfiguration):
        raise TypeError(f"dataloader_config={config!r} must be an ember.DataLoaderConfiguration or None")
    if even_batches is not None:
        raise ValueError(
            f"pass even_batches either to the Accelerator (even_batches={even_batches!r}) or in dataloader_config "
            f"(even_batches={config.even_batches!r}), not both"
        )
    return config


class DataLoaderSettings:
    """Mixed into the Accelerator: its dataloader settings, as 🤗 Accelerate's attributes."""

    _dataloader_config: DataLoaderConfiguration

    @property
    def dataloader_config(self) -> DataLoaderConfiguration:
        return self._dataloader_config

    @property
    def split_batches(self) -> bool:
        return self._dataloader_config.split_batches

    @property
    def use_seedable_sampler(self) -> bool:
        return self._dataloader_config.use_seedable_sampler

    @property
    def use_stateful_dataloader(self) -> bool:
        return self._dataloader_config.use_stateful_dataloader

    @property
    def non_blocking(self) -> bool:
        return self._dataloader_config.non_blocking

    @property
    def dispatch_batches(self) -> bool | None:
        return self._dataloader_config.dispatch_batches

    @property
    def even_batches(self) -> bool:
        return self._dataloader_config.even_batches

    @even_batches.setter
    def even_batches(self, value: bool) -> None:
        """For the dataloaders prepared from now on, and ``join_uneven_inputs``' default (as 🤗
        Accelerate's setter); the loaders prepared before keep theirs."""
        check_bool("even_batches", value)
        self._dataloader_config.even_batches = value
