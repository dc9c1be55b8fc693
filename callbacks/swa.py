"""``StochasticWeightAveraging``: average the weights of the last epochs under a SWA learning rate."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from typing_extensions import override

from ember._validation import show
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["StochasticWeightAveraging"]

_STRATEGIES = ("cos", "linear")
_OWNER = "StochasticWeightAveraging"
_CPU = torch.device("cpu")  # the default device of the average, as Lightning's
#: ``avg_fn(averaged, current, n_averaged)``: the new average (n_averaged, a tensor, counts the earlier ones).
AverageFunction = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def copy_saved_average(owner: str, what: str, saved: dict[str, Any], names: list[str], tensors: Any) -> None:
    """Copy a checkpoint's averaged tensors ``saved`` (by name) into ``tensors`` (in ``names``'
    order); a checkpoint of another module (other names) is a ``ValueError``. Shared by
    ``StochasticWeightAveraging`` and ``WeightAveraging``."""
    if list(saved) != names:
        raise ValueError(
            f"{owner}: the checkpoint averages {what}{show(list(saved))}, and the module has {show(names)}"
        )
    with torch.no_grad():
        for mine, name in zip(tensors, names, strict=True):
            mine.copy_(saved[name])


def _bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{_OWNER}({name}={show(value)}) is not valid: {expected}")


def _check_lrs(swa_lrs: Any) -> None:
    values = swa_lrs if isinstance(swa_lrs, (list, tuple)) else [swa_lrs]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise _bad("swa_lrs", swa_lrs, "give a learning rate > 0, or a list of them, one per parameter group")


def _check_start(start: Any) -> None:
    valid_int = isinstance(start, int) and not isinstance(start, bool) and start >= 1
    if not (valid_int or (isinstance(start, float) and 0.0 <= start <= 1.0)):
        raise _bad(
            "swa_epoch_start",
            start,
            "give an int epoch >= 1 (counted from 1) or a float fraction of max_epochs in [0, 1]",
        )


def _check_device(device: Any) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError:
            pass
    raise _bad("device", device, "give a torch.device, a device string such as 'cpu' or 'cuda:0', or None "
               "(the module's device)")  # fmt: skip


class StochasticWeightAveraging(Callback):
    """Stochastic Weight Averaging (Izmailov et al., 2018), as Lightning's callback of the same name.

    From epoch :attr:`swa_start` on, the LR schedule is replaced by ``torch.optim.swa_utils.SWALR``,
    which anneals each parameter group's learning rate to ``swa_lrs`` over ``annealing_epochs``
    epochs (``annealing_strategy`` ``"cos"`` or ``"linear"``), and the weights at the end of every
    training epoch from :attr:`swa_start` on are averaged in a ``torch.optim.swa_utils.AveragedModel``
    kept on ``device`` (``None``: the module's device). At the end of training the averaged weights
    are copied into the module, and the running statistics of its BatchNorm layers are recomputed with
    one pass over the training data (``torch.optim.swa_utils.update_bn``).

    ``swa_epoch_start``: an int ``k >= 1`` starts at the ``k``-th epoch, counted from 1 (``swa_start
    = k - 1``); a float ``f`` in ``[0, 1]`` at the ``int(f * max_epochs)``-th. ``avg_fn(averaged,
    current, n_averaged)`` replaces the equal-weight running mean. The average, its count and the
    SWALR position are saved in checkpoints, so a resumed fit ends with the same weights.

    Example::

        Trainer(max_epochs=20, callbacks=[StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=15)])
    """

    def __init__(
        self,
        swa_lrs: float | Sequence[float],
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: str = "cos",
        avg_fn: AverageFunction | None = None,
        device: torch.device | str | None = _CPU,
    ) -> None:
        _check_lrs(swa_lrs)
        _check_start(swa_epoch_start)
        if (
            isinstance(annealing_epochs, bool)
            or not isinstance(annealing_epochs, int)
            or annealing_epochs < 0
        ):
            raise _bad(
                "annealing_epochs", annealing_epochs, "give an int >= 0 (0: the SWA learning rate at once)"
            )
        if annealing_strategy not in _STRATEGIES:
            raise _bad("annealing_strategy", annealing_strategy, "valid choices are 'cos', 'linear'")
        if avg_fn is not None and not callable(avg_fn):
            raise _bad("avg_fn", avg_fn, "give a function (averaged, current, n_averaged) -> tensor, or None")
        self._device = _check_device(device)
        self._swa_lrs: float | list[float] = (
            float(swa_lrs) if isinstance(swa_lrs, (int, float)) else [float(lr) for lr in swa_lrs]
        )
        self._swa_epoch_start = swa_epoch_start
        self._annealing_epochs = annealing_epochs
        self._annealing_strategy = cast(Literal["cos", "linear"], annealing_strategy)
        self._avg_fn = avg_fn
        self._swa_start: int | None = None
        self._max_epochs: int | None = None  # the fit's, once it started
        self._reset()

    def _reset(self) -> None:
        """Forget the state of an earlier fit (a new fit starts afresh, or from its checkpoint)."""
        self._average: AveragedModel | None = None
        self._names: list[str] = []
        self._source: nn.ParameterList | None = None
        self._scheduler: SWALR | None = None
        self._latest_update_epoch = -1
        self._restored: dict[str, Any] | None = None

    # -- what users read --------------------------------------------------------------------------
    @property
    def swa_start(self) -> int:
        """The first SWA epoch, counted from 0 (``trainer.current_epoch``); known once a fit started
        when ``swa_epoch_start`` is a fraction of ``max_epochs``."""
        if self._swa_start is None:
            if isinstance(self._swa_epoch_start, float):
                raise RuntimeError("swa_start is a fraction of max_epochs: it is known once fit() started")
            return max(self._swa_epoch_start - 1, 0)
        return self._swa_start

    @property
    def swa_end(self) -> int:
        """The last SWA epoch, counted from 0: the fit's ``max_epochs - 1`` (Lightning's; -2 without an
        epoch limit, as there). Known once a fit started."""
        if self._max_epochs is None:
            raise RuntimeError("swa_end is known once fit() started: it is max_epochs - 1")
        return self._max_epochs - 1

    @property
    def n_averaged(self) -> int:
        """How many epochs' weights the average holds."""
        return 0 if self._average is None else int(self._average.n_averaged)

    # -- hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.strategy.supports_weight_averaging:
            raise ValueError(
                f"{_OWNER} keeps a full copy of the weights on every process, which the "
                f"{trainer.strategy.strategy_name!r} strategy does not hold (sharded parameters, or an engine "
                "that owns the step): use DDP or a single device (Strategy.supports_weight_averaging)"
            )
        start = self._swa_epoch_start
        self._max_epochs = -1 if trainer.max_epochs is None else trainer.max_epochs
        if isinstance(start, float):
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs == -1:
                raise ValueError(
                    f"{_OWNER}(swa_epoch_start={start}) is a fraction of max_epochs, and this Trainer has none "
                    f"(max_epochs={max_epochs}): give an int epoch, or Trainer(max_epochs=...)"
                )
            start = int(start * max_epochs)
        self._swa_start = max(start - 1, 0)
        self._reset()

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"{_OWNER} works with one optimizer; configure_optimizers() returned {len(optimizers)}"
            )
        if len(trainer.lr_scheduler_configs) > 1:
            raise ValueError(
                f"{_OWNER} replaces the LR scheduler with SWALR, and configure_optimizers() returned "
                f"{len(trainer.lr_scheduler_configs)}: return at most one"
            )
        groups = len(optimizers[0].param_groups)
        if isinstance(self._swa_lrs, list) and len(self._swa_lrs) != groups:
            raise ValueError(
                f"{_OWNER}(swa_lrs={show(self._swa_lrs)}) gives {len(self._swa_lrs)} learning rates for the "
                f"optimizer's {groups} parameter groups: give one per group, or a single float"
            )
        max_epochs = trainer.max_epochs
        if max_epochs not in (None, -1) and self.swa_start >= max_epochs and trainer.is_global_zero:
            warnings.warn(
                f"{_OWNER}: swa_start={self.swa_start} (counted from 0) is past the last epoch of "
                f"max_epochs={max_epochs}: no weights will be averaged",
                stacklevel=2,
            )

    @override
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        # A resumed fit: the average and SWALR come back before the first batch (a fit resumed in
        # the middle of an epoch starts no epoch).
        restored, self._restored = self._restored, None
        if restored is not None:
            self._latest_update_epoch = int(restored["latest_update_epoch"])
            if restored["started"]:
                self._start(trainer, module, restored)

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._average is not None or trainer.current_epoch < self.swa_start:
            return
        if trainer.current_epoch > self.swa_start and trainer.is_global_zero:
            warnings.warn(
                f"{_OWNER} starts at epoch {trainer.current_epoch}, after swa_start={self.swa_start}: the "
                "checkpoint this fit resumed from has no SWA state, so the epochs before are not averaged",
                stacklevel=2,
            )
        self._start(trainer, module, None)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        # Before the Trainer steps SWALR (after this hook): torch's order, average then schedule.
        if self._average is None or trainer.current_epoch <= self._latest_update_epoch:
            return
        assert self._source is not None
        self._average.update_parameters(self._source)
        self._latest_update_epoch = trainer.current_epoch

    @override
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._average is None or self.n_averaged == 0:
            return
        with torch.no_grad():
            for averaged, parameter in zip(
                self._average.module.parameters(), module.parameters(), strict=True
            ):
                parameter.copy_(averaged.to(parameter.device))
        layers = [layer for layer in module.modules() if isinstance(layer, _BatchNorm)]
        if layers:
            self._recompute_batch_norm(trainer, module, layers)

    # -- checkpoints ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"started": self._average is not None, "n_averaged": self.n_averaged,
                                 "latest_update_epoch": self._latest_update_epoch}  # fmt: skip
        if self._average is not None:
            assert self._scheduler is not None  # (built together)
            parameters = self._average.module.parameters()
            state["averaged"] = {name: p.detach() for name, p in zip(self._names, parameters, strict=True)}
            # (older torch keeps the annealing function in the scheduler's state: rebuilt, not saved)
            state["scheduler"] = {k: v for k, v in self._scheduler.state_dict().items() if not callable(v)}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_train_start, once the optimizer is there

    # -- internals --------------------------------------------------------------------------------
    def _start(self, trainer: Trainer, module: TrainModule, restored: dict[str, Any] | None) -> None:
        """Build the average (empty, or as ``restored``) and put SWALR in place of the LR schedule."""
        from ember.trainer.optim import LRSchedulerConfig  # (ember.trainer imports the callbacks)

        named = list(module.named_parameters())
        self._names = [name for name, _ in named]
        holder = nn.ParameterList(
            nn.Parameter(torch.empty_like(p, device=self._device or p.device), requires_grad=False)
            for _, p in named
        )  # AveragedModel copies what it is given: an empty holder, not the module and its trainer
        self._average = AveragedModel(holder, device=self._device, avg_fn=self._avg_fn)
        # The module's parameters themselves, without its buffers (update_parameters also copies
        # the buffers of what it averages, which the holder has none of).
        self._source = nn.ParameterList(p for _, p in named)
        optimizer = trainer.optimizers[0]
        lrs = (
            self._swa_lrs
            if isinstance(self._swa_lrs, list)
            else [self._swa_lrs] * len(optimizer.param_groups)
        )
        self._scheduler = SWALR(
            optimizer,
            swa_lr=cast(float, lrs),  # (annotated as a float, it takes one per parameter group)
            anneal_epochs=self._annealing_epochs,
            anneal_strategy=self._annealing_strategy,
        )
        if restored is not None:
            self._load(restored)
        # No name, as Lightning's: LearningRateMonitor goes on logging it as lr-{OptimizerClass}.
        config = LRSchedulerConfig(scheduler=self._scheduler, interval="epoch", frequency=1)
        if trainer.lr_scheduler_configs:  # (the Trainer keeps the replaced one in its checkpoints)
            trainer.lr_scheduler_configs[0] = config
        else:
            trainer.lr_scheduler_configs.append(config)

    def _load(self, restored: dict[str, Any]) -> None:
        assert self._average is not None and self._scheduler is not None
        parameters = self._average.module.parameters()
        copy_saved_average(_OWNER, "the parameters ", restored["averaged"], self._names, parameters)
        self._average.n_averaged.fill_(int(restored["n_averaged"]))
        self._scheduler.load_state_dict(restored["scheduler"])

    def _recompute_batch_norm(self, trainer: Trainer, module: TrainModule, layers: list[_BatchNorm]) -> None:
        """``update_bn`` over the prepared training loader (``limit_train_batches`` of it), through
        the precision plugin; on several processes, the statistics are averaged across them."""
        loader = trainer.train_dataloader
        if loader is None:
            return
        position = loader.state_dict()  # this extra pass leaves the loader where the fit left it
        precision = trainer.precision
        limit = trainer.num_training_batches
        batches = iter(loader)
        try:
            todo = itertools.islice(batches, int(limit)) if math.isfinite(limit) else batches
            with precision.forward_context():
                update_bn((precision.convert_input(batch) for batch in todo), module)
        finally:
            batches.close()  # type: ignore[attr-defined]  # (a pass stopped at the limit ends here)
            loader.load_state_dict(position)
        if trainer.world_size > 1:  # each process saw its shard of the data: one set of statistics for all
            with torch.no_grad():
                for layer in layers:
                    for buffer in (layer.running_mean, layer.running_var):
                        if buffer is not None:
                            buffer.copy_(trainer.accelerator.reduce(buffer, "mean"))
