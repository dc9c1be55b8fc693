"""What ``MetricStore`` saves in a mid-epoch checkpoint: the training epoch's running aggregates, the
torchmetrics states and the callback metrics (a mixin of :class:`~ember.trainer.logging.MetricStore`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember.trainer.logged_values import _Entry, is_metric

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["StoreCheckpoint"]


class StoreCheckpoint:
    """``state_dict`` / ``load_state_dict`` of the store, for checkpoints taken inside an epoch."""

    _entries: dict[str, _Entry]
    _parked: dict[str, _Entry] | None
    _spent: list[Metric]
    callback_metrics: dict[str, torch.Tensor]

    def state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The training epoch's running aggregates (parked or not), torchmetrics states named by their
        path in ``module``, and the callback metrics (monitored values after a resume)."""
        paths = {id(m): name for name, m in module.named_modules() if is_metric(m)}
        entries = {}
        training = self._parked if self._parked is not None else self._entries
        for key, entry in training.items():
            # (a process group is no value to save: the resumed fit's next self.log call sets it again)
            state = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name != "group"}
            state["metric"] = paths.get(id(entry.metric)) if entry.metric is not None else None
            entries[key] = state
        metrics = {
            name: {"state": dict(m.metric_state), "update_count": m._update_count}
            for name, m in module.named_modules()
            if is_metric(m)
        }
        # (a checkpoint of on_train_epoch_end, taken before reset_spent: the resumed fit resets them)
        spent = [paths[id(m)] for m in self._spent if id(m) in paths]
        return {"entries": entries, "metrics": metrics, "callback_metrics": dict(self.callback_metrics),
                "spent": spent}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any], module: nn.Module) -> None:
        modules = dict(module.named_modules())
        self._entries = {}
        for key, saved in state["entries"].items():
            saved = dict(saved)
            path = saved.pop("metric")
            self._entries[key] = _Entry(**saved, metric=modules[path] if path is not None else None)  # type: ignore[arg-type]
        for name, saved in state["metrics"].items():
            metric = modules[name]
            for attr, value in saved["state"].items():
                setattr(metric, attr, value)
            metric._update_count = saved["update_count"]
            metric._computed = None
        for name in state.get("spent", ()):  # (checkpoints written before it was saved have none)
            modules[name].reset()
        self.callback_metrics.update(state["callback_metrics"])
