"""What ``self.log`` records: step values, batch-size-weighted epoch aggregates, torchmetrics metrics.

Values stay tensors on their device; nothing here calls ``.item()``. The Trainer converts to Python
numbers only when a logger row is written (every ``log_every_n_steps``) or the progress bar draws.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ember.trainer.logged_values import _Entry, as_scalar, forked_name, infer_batch_size, is_metric
from ember.trainer.metric_checkpoint import StoreCheckpoint

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["MetricStore"]

_REDUCE_FX = ("mean", "sum", "max", "min")


# Hooks called once per batch: values logged there default to per-step.
_STEP_HOOKS = {
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step",
}  # fmt: skip
# Hooks called once per epoch: values logged there are final epoch values (nothing to aggregate).
_EPOCH_END_HOOKS = {
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_test_epoch_start", "on_test_epoch_end", "on_fit_start", "on_train_start", "on_validation_start",
    "on_test_start", "on_validation_end", "on_test_end",
}  # fmt: skip
# Hooks of an evaluation batch: on_step=True is possible there too (Lightning's); those step values
# get a row after each batch, and stay out of callback_metrics.
_EVAL_STEP_HOOKS = {
    "validation_step", "test_step", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end",
}  # fmt: skip


class MetricStore(StoreCheckpoint):
    """Collects ``self.log`` calls for the running stage; the Trainer reads step rows and epoch results."""

    def __init__(self, reduce: Callable[[torch.Tensor, str, Any], torch.Tensor]) -> None:
        # all-reduce: (tensor, "mean" | "sum" | "max" | "min", process group or None for all) -> tensor
        self._reduce = reduce
        self.fx = ""  # the hook or step running now (sets the on_step/on_epoch defaults)
        self.dataloader_suffix = ""  # "/dataloader_idx_N" while evaluating one of several loaders
        self.loader_of: dict[
            str, str
        ] = {}  # names logged with add_dataloader_idx=False: their loader's suffix
        self._batch: Any = None  # the running batch; its size is inferred when an epoch value needs it
        self._batch_size: int | None = 1
        self._detach_source: torch.Tensor | None = None  # the tensor detached last (see detached)
        self._detach_result: torch.Tensor | None = None
        self._entries: dict[str, _Entry] = {}
        # Names whose entry holds a per-step value of a step hook, logged with the default options and
        # no sync: a later call with a scalar tensor only publishes it (the short path of ``log``).
        self._step_only: dict[str, _Entry] = {}
        self._parked: dict[str, _Entry] | None = None  # training aggregates while validation runs
        # torchmetrics metrics of the epoch that ended: reset after the epoch-end hooks (reset_spent),
        # which may still compute() them, as in Lightning (those logged per step only included).
        self._spent: list[Metric] = []
        self.step_values: dict[str, torch.Tensor] = {}  # logged in the current batch, for the next logger row
        # Earlier batches' step values and epoch values logged with logger=True, and trainer.log_metrics
        # rows: with step_values and epoch_row, trainer.logged_metrics (logged_values)
        self._logged: dict[str, torch.Tensor | float] = {}
        self.epoch_row: dict[str, torch.Tensor] = {}  # epoch values waiting for the next logger row
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar: dict[str, torch.Tensor] = {}
        # Evaluation rows of step values, per stage ("validation", "test"): its first loader (held
        # weakly: reloaded loaders start again) and each loader's batches evaluated before (eval_steps).
        self._eval_steps: dict[str, tuple[weakref.ref[Any], list[int]]] = {}

    # -- recording -------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        on_step: bool | None,
        on_epoch: bool | None,
        prog_bar: bool,
        logger: bool,
        sync_dist: bool,
        reduce_fx: str,
        batch_size: int | None,
        group: Any = None,
    ) -> None:
        # The usual call, first: a step's scalar tensor (a loss), under a name logged before in the
        # same way (its entry still the live one): only the detached value is published.
        entry = self._step_only.get(name)
        if (
            entry is not None
            and type(value) is torch.Tensor
            and on_step is None
            and on_epoch is None
            and not sync_dist
            and reduce_fx == entry.reduce_fx
            and self.fx in _STEP_HOOKS
            and not self.dataloader_suffix
            and value.dim() == 0
            and self._entries.get(name) is entry
        ):
            detached = self.detached(value)
            self.callback_metrics[name] = detached
            if entry.logger:
                self.step_values[name] = detached
            if entry.prog_bar:
                self.progress_bar[name] = detached
            return
        if reduce_fx not in _REDUCE_FX:
            raise ValueError(
                f"log({name!r}, reduce_fx={reduce_fx!r}): valid choices are {', '.join(map(repr, _REDUCE_FX))}"
            )
        fx = self.fx
        in_step = fx in _STEP_HOOKS
        defaults = on_step is None and on_epoch is None
        on_step = in_step if on_step is None else on_step
        on_epoch = (not in_step) if on_epoch is None else on_epoch
        if on_step and not in_step and fx and fx not in _EVAL_STEP_HOOKS:
            raise ValueError(
                f"log({name!r}, on_step=True) is not possible in {fx}, which runs outside the batches: "
                "on_step=True works in training_step, validation_step, test_step and their batch hooks; "
                "log with on_epoch=True here"
            )
        if not (on_step or on_epoch):
            raise ValueError(
                f"log({name!r}): on_step and on_epoch are both False, so the value would go nowhere"
            )
        key = name + self.dataloader_suffix if self.dataloader_suffix else name
        # The usual value, a scalar tensor (a loss), is recognised first: this runs every step.
        plain = type(value) is torch.Tensor and value.dim() == 0
        metric = None if plain or not is_metric(value) else value
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(
                on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx, metric
            )
        elif entry.computed is not None:  # logged again in a later loader (add_dataloader_idx=False)
            entry.computed = None
        if sync_dist:
            entry.group = group  # (the live object: checkpoints do not keep it, see state_dict)
        if plain:
            tensor: torch.Tensor | None = self.detached(value)
        elif metric is not None:
            tensor = metric._forward_cache if on_step and metric._forward_cache is not None else None
        else:
            tensor = as_scalar(name, value)
        if on_step and tensor is not None:
            if sync_dist:
                tensor = self._sync(tensor, reduce_fx, group)
            if not in_step and fx:  # an evaluation batch: its row and the bar only (as Lightning)
                step_key = forked_name(key, "_step") if on_epoch else key
                if entry.logger:
                    self.step_values[step_key] = tensor
                if entry.prog_bar:
                    self.progress_bar[step_key] = tensor
            elif on_epoch:
                self._publish(forked_name(key, "_step"), tensor, entry, self.step_values, alias=key)
            else:  # the value of a training step
                self.callback_metrics[key] = tensor
                if entry.logger:
                    self.step_values[key] = tensor
                if entry.prog_bar:
                    self.progress_bar[key] = tensor
                if plain and in_step and defaults and not sync_dist and key == name:
                    self._step_only[name] = entry  # the next such call takes the short path
        if on_epoch and metric is None and tensor is not None:
            if fx in _EPOCH_END_HOOKS:  # a final value: nothing to aggregate
                self._publish(
                    forked_name(key, "_epoch") if on_step else key,
                    tensor,
                    entry,
                    self.epoch_row,
                    key if on_step else None,
                )
                del self._entries[key]
            else:
                self._accumulate(entry, tensor, batch_size if batch_size is not None else self.batch_size)

    def _accumulate(self, entry: _Entry, value: torch.Tensor, batch_size: int) -> None:
        value = value.detach().double()
        if entry.reduce_fx == "mean":
            contribution = value * batch_size
            entry.total = contribution if entry.total is None else entry.total + contribution
            entry.weight += batch_size
        elif entry.total is None:
            entry.total = value
        elif entry.reduce_fx == "sum":
            entry.total = entry.total + value
        else:
            entry.total = (
                torch.maximum(entry.total, value)
                if entry.reduce_fx == "max"
                else torch.minimum(entry.total, value)
            )

    def _sync(self, tensor: torch.Tensor, reduce_fx: str, group: Any) -> torch.Tensor:
        if reduce_fx == "mean":
            return self._reduce(tensor.double(), "mean", group)
        return self._reduce(tensor, reduce_fx, group)

    def _publish(
        self,
        key: str,
        value: torch.Tensor,
        entry: _Entry,
        to_row: dict[str, torch.Tensor],
        alias: str | None = None,
    ) -> None:
        """Make a value visible: callback metrics (also under ``alias``), the logger row, the progress bar."""
        if value.requires_grad:  # values from as_scalar are detached already
            value = value.detach()
        self.callback_metrics[key] = value
        if alias is not None:
            self.callback_metrics[alias] = value
        if entry.logger:
            to_row[key] = value
        if entry.prog_bar:
            self.progress_bar[key] = value

    # -- the Trainer's side ------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """The running batch's size (the weight of its values in epoch means), inferred once, on demand."""
        if self._batch_size is None:
            self._batch_size, self._batch = infer_batch_size(self._batch), None
        return self._batch_size

    def detached(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor.detach()``, made once per batch for the same tensor: the loss is usually logged,
        and returned to ``on_train_batch_end``, detached both times."""
        if tensor is not self._detach_source:
            self._detach_source, self._detach_result = tensor, tensor.detach()
        return self._detach_result  # type: ignore[return-value]

    def begin_batch(self, batch: Any) -> None:
        self._batch, self._batch_size = batch, None  # most steps log no epoch value: no inference
        self._detach_source = self._detach_result = None  # nothing of the last batch kept alive
        if self.step_values:  # (the last row's values went to the loggers, or not: logged_values keeps them)
            self._logged.update(self.step_values)
            self.step_values = {}

    def finish_epoch(self) -> None:
        """Turn the aggregates of the running stage into epoch values (torchmetrics metrics: compute()).

        Collectives (``sync_dist`` and torchmetrics' own sync) run in sorted key order on every rank.
        """
        self._batch = None  # not kept alive past its stage
        for key in sorted(self._entries):
            entry = self._entries[key]
            if not entry.on_epoch:
                if entry.metric is not None:
                    self._spent.append(entry.metric)
                continue
            out_key = forked_name(key, "_epoch") if entry.on_step else key
            if entry.metric is not None:
                value = entry.metric.compute().detach() if entry.computed is None else entry.computed
                self._spent.append(entry.metric)  # (reset after the epoch-end hooks: reset_spent)
            elif entry.total is None:
                continue
            elif entry.reduce_fx == "mean":
                total, weight = (
                    entry.total,
                    torch.tensor(entry.weight, dtype=torch.float64, device=entry.total.device),
                )
                if entry.sync_dist:
                    total, weight = (
                        self._reduce(total, "sum", entry.group),
                        self._reduce(weight, "sum", entry.group),
                    )
                value = (total / weight).float()
            else:
                value = (
                    self._reduce(entry.total, entry.reduce_fx, entry.group)
                    if entry.sync_dist
                    else entry.total
                )
                value = value.float()
            self._publish(out_key, value, entry, self.epoch_row, alias=key if entry.on_step else None)
        self._entries, self._step_only = {}, {}

    def end_loader(self) -> None:
        """One of several evaluation loaders ended: compute the metrics logged for it now, as Lightning
        does when the loader changes (one Metric object logged for every loader shows its running
        value at the end of each). Sorted key order, the same on every rank (torchmetrics' sync)."""
        suffix = self.dataloader_suffix
        for key in sorted(self._entries):
            entry = self._entries[key]
            if (
                entry.metric is not None
                and entry.on_epoch
                and entry.computed is None
                and (key.endswith(suffix) or self.loader_of.get(key) == suffix)
            ):
                entry.computed = entry.metric.compute().detach()

    def eval_steps(self, prefix: str, loaders: list[Any]) -> list[int]:
        """Each loader's batches evaluated so far, the step of its next evaluation row of step values
        (the caller counts on): Lightning's, on over a fit's validation runs, from 0 in each stage."""
        if not loaders:
            return []
        kept = self._eval_steps.get(prefix)
        if kept is None or kept[0]() is not loaders[0]:
            kept = self._eval_steps[prefix] = (weakref.ref(loaders[0]), [0] * len(loaders))
        return kept[1]

    def take_epoch_row(self) -> dict[str, torch.Tensor]:
        row, self.epoch_row = self.epoch_row, {}
        self._logged.update(row)
        return row

    def logged_values(self) -> dict[str, torch.Tensor | float]:
        """What ``trainer.logged_metrics`` holds, as Lightning's: the last value of every name logged
        with ``logger=True`` in the running stage, whether a logger row took it or not (a batch between
        two ``log_every_n_steps`` rows, a fit without a logger), and the rows of ``trainer.log_metrics``."""
        return {**self._logged, **self.step_values, **self.epoch_row}

    def note_logged(self, row: dict[str, float]) -> None:
        """A row sent to the loggers outside ``self.log`` (``trainer.log_metrics``)."""
        self._logged.update(row)

    def park(self) -> None:
        """Set the training epoch's aggregates aside while a validation run logs its own."""
        self._parked, self._entries = self._entries, {}

    def unpark(self) -> None:
        assert self._parked is not None
        self._entries, self._parked = self._parked, None

    def reset_spent(self) -> None:
        """Reset the torchmetrics metrics of the epoch that ended (its end hooks have run)."""
        for metric in self._spent:
            metric.reset()
        self._spent = []

    def reset(self) -> None:
        """Forget everything of the running stage (a new fit, validate, or sanity check)."""
        self.reset_spent()
        for entry in self._entries.values():
            if entry.metric is not None:
                entry.metric.reset()
        self._logged.update(self.logged_values())  # (a new epoch: what was logged stays logged)
        self._entries, self.step_values, self.epoch_row, self._step_only = {}, {}, {}, {}

    def clear(self) -> None:
        """:meth:`reset`, and forget the values logged so far (a new stage, or after the sanity check)."""
        self.reset()
        self._logged.clear()
        self.callback_metrics.clear()
        self.progress_bar.clear()
        self._eval_steps.clear()
