"""``SpikeDetection``: stop the fit when the training loss jumps away from its running mean, naming
the batches to skip when it is resumed."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from ember._validation import check_bool, check_int, check_number, check_path, show
from ember.callbacks.base import Callback

if TYPE_CHECKING:
    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["SpikeDetection", "TrainingSpikeException"]

_FILE = "skip_batches.json"


class TrainingSpikeException(RuntimeError):
    """Raised by :class:`SpikeDetection` on every process when one of them saw a loss spike."""

    def __init__(self, batch_idx: int) -> None:
        super().__init__(f"Training spike detected in batch {batch_idx}")
        self.batch_idx = batch_idx


class SpikeDetection(Callback):
    """Stop training with :class:`TrainingSpikeException` when the loss of a training batch spikes,
    as Lightning's callback of the same name.

    After ``warmup`` batches of each epoch, a batch's loss is a spike when it is worse than the last
    loss kept (higher for ``mode="min"``) and differs from the mean of the last ``window`` kept
    losses by at least ``atol`` and by at least ``rtol`` times that mean (``None``: that test
    passes); with ``finite_only`` a NaN or infinite loss is a spike too (without it, such a loss
    takes the same test: an infinite one in the worse direction is a spike), and is never kept. A
    finite loss that is no spike is kept. On a spike, the batch and the one before it are
    added to the list in ``exclude_batches_path`` (a JSON file; default
    ``<default_root_dir>/skip_batches.json``; a directory gets that name in it), written by global
    rank 0, and every process raises. Each process watches its own loss; one spike stops them all.

    Example::

        Trainer(callbacks=[SpikeDetection(window=20, rtol=3.0)])
    """

    def __init__(
        self,
        mode: str = "min",
        window: int = 10,
        warmup: int = 1,
        atol: float | None = None,
        rtol: float | None = 2.0,
        exclude_batches_path: str | os.PathLike[str] | None = None,
        finite_only: bool = True,
    ) -> None:
        owner = "SpikeDetection"
        if mode not in ("min", "max"):
            raise ValueError(f"{owner}(mode={show(mode)}): valid choices are 'min', 'max'")
        check_int("window", window, minimum=1, owner=owner)
        check_int("warmup", warmup, minimum=0, owner=owner)
        check_number("atol", atol, minimum=0, owner=owner, optional=True)
        check_number("rtol", rtol, minimum=0, owner=owner, optional=True)
        check_path("exclude_batches_path", exclude_batches_path, owner=owner, optional=True)
        check_bool("finite_only", finite_only, owner=owner)
        self.mode, self.window, self.warmup, self.atol, self.rtol = mode, window, warmup, atol, rtol
        self.exclude_batches_path = None if exclude_batches_path is None else str(exclude_batches_path)
        self.finite_only = finite_only
        self.bad_batches: list[int] = []
        self._values: deque[float] = deque(maxlen=window)  # the last losses kept
        self.last_val = 0.0

    @property
    def running_mean(self) -> float:
        """The mean of the last ``window`` losses kept (NaN before the first)."""
        return sum(self._values) / len(self._values) if self._values else math.nan

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss(outputs)
        spike = batch_idx >= self.warmup and self._is_spike(loss)
        finite = math.isfinite(loss)
        if trainer.world_size > 1:  # one spike stops every process; a loss is kept where all are finite
            flags = torch.tensor([float(spike), float(not finite)], device=trainer.accelerator.device)
            spike, nonfinite = (bool(v) for v in trainer.strategy.all_reduce(flags, "max").tolist())
            finite = not nonfinite
        if spike:
            self._stop(trainer, batch_idx)
        if finite:
            self._values.append(loss)
            self.last_val = loss

    def _is_spike(self, loss: float) -> bool:
        if self.finite_only and not math.isfinite(loss):
            return True
        # Without finite_only a non-finite loss takes the same test, as in Lightning: an infinite
        # loss in the worse direction is a spike; NaN compares false, so it is one only when atol
        # and rtol are both None.
        change = loss - self.last_val
        if (change <= 0) if self.mode == "min" else (change >= 0):  # not worse than the last kept
            return False
        mean = self.running_mean
        distance = abs(loss - mean)  # (NaN before any loss is kept, or for a NaN loss: no spike)
        return (self.atol is None or distance >= self.atol) and (
            self.rtol is None or distance >= abs(self.rtol * mean)
        )

    def _stop(self, trainer: Trainer, batch_idx: int) -> None:
        # The batch may be bad data; the one before may have pushed the weights somewhere bad.
        self.bad_batches.extend([batch_idx - 1, batch_idx])
        if trainer.is_global_zero:
            path = self.skip_file(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.tmp")
            partial.write_text(json.dumps(self.bad_batches, indent=4))
            os.replace(partial, path)
        raise TrainingSpikeException(batch_idx)

    def skip_file(self, trainer: Trainer) -> Path:
        """Where the batches to skip are written: ``exclude_batches_path``, resolved."""
        given = self.exclude_batches_path
        path = Path(trainer.default_root_dir if given is None else given)
        return path if path.suffix == ".json" else path / _FILE

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "values": list(self._values),
            "last_val": self.last_val,
            "bad_batches": list(self.bad_batches),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._values = deque((float(v) for v in state_dict["values"]), maxlen=self.window)
        self.last_val = float(state_dict["last_val"])
        self.bad_batches = [int(b) for b in state_dict["bad_batches"]]


def _loss(outputs: Any) -> float:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            "SpikeDetection watches the loss training_step returns (a one-element tensor, or a dict with "
            f"'loss'); it returned {show(outputs)}"
        )
    return float(loss)
