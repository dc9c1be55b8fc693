"""Several training dataloaders as one: Lightning's ``CombinedLoader`` and its prepared form.

``trainer.fit(module, [loader_a, loader_b])`` (or a dict, or a nesting of lists, tuples and dicts)
trains on ``CombinedLoader(loaders, "max_size_cycle")``: each batch is the same collection of the
loaders' batches. The prepared form keeps each loader a prepared loader of its own (sharded,
reshuffled each epoch, its position saved by ``save_state``), so a mid-epoch checkpoint resumes
with the same next batch of every loader.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from ember.data import LoopState, PreparedDataLoader

__all__ = ["CombinedLoader"]

MODES = ("min_size", "max_size_cycle", "max_size", "sequential")
TRAIN_MODES = ("max_size_cycle", "min_size", "max_size")
_LENGTH: dict[str, Callable[[list[int]], int]] = {
    "min_size": min,
    "max_size_cycle": max,
    "max_size": max,
    "sequential": sum,
}


class CombinedLoader:
    """Iterates several iterables (dataloaders) together, as Lightning's ``CombinedLoader``.

    ``iterables``: one iterable, or a list, tuple or dict of them (nested too). ``mode``:

    - ``"min_size"``: batches until the shortest is exhausted.
    - ``"max_size_cycle"``: until the longest is exhausted; shorter ones start again (the
      Trainer's default for a list or dict of training loaders).
    - ``"max_size"``: until the longest is exhausted; an exhausted one gives ``None``.
    - ``"sequential"``: one iterable after the other (not for training, as in Lightning).

    Iterating yields ``(batch, batch_idx, dataloader_idx)`` as Lightning's does; the Trainer hands
    ``batch`` (the collection of the loaders' batches, shaped as ``iterables``) to ``training_step``::

        trainer.fit(module, CombinedLoader({"a": loader_a, "b": loader_b}, mode="min_size"))
    """

    def __init__(self, iterables: Any, mode: str = "min_size") -> None:
        if mode not in MODES:
            raise ValueError(f"CombinedLoader(mode={mode!r}): choose one of {', '.join(MODES)}")
        self.iterables = iterables
        self.mode = mode
        self.flattened, self._spec = tree_flatten(iterables)

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        if self.mode == "sequential":
            for index, iterable in enumerate(self.flattened):
                for batch_idx, batch in enumerate(iterable):
                    yield batch, batch_idx, index
            return
        for batch_idx, out in enumerate(_combine(self.mode, self.flattened, 0, None)):
            yield tree_unflatten(out, self._spec), batch_idx, 0

    def __len__(self) -> int:
        return _LENGTH[self.mode]([len(iterable) for iterable in self.flattened])


def _combine(
    mode: str, iterables: list[Any], start: int, total: int | None, exhausted: list[bool] | None = None
) -> Generator[list[Any], None, None]:
    """The flat combined batches of ``iterables`` from ``start`` (each iterable already there) to
    ``total`` (None: until the mode's end). A "max_size_cycle" iterable starts again when exhausted;
    ``exhausted``: which ran out already in this epoch (a resumed epoch's)."""
    iterators = [iter(iterable) for iterable in iterables]
    exhausted = list(exhausted) if exhausted is not None else [False] * len(iterables)
    position = start
    try:
        while total is None or position < total:
            out: list[Any] = []
            for i, iterator in enumerate(iterators):
                try:
                    out.append(next(iterator))
                    continue
                except StopIteration:
                    exhausted[i] = True
                if mode == "min_size" or all(exhausted):
                    return
                if mode == "max_size":
                    out.append(None)
                    continue
                _close(iterator)
                iterators[i] = iter(iterables[i])
                out.append(next(iterators[i], None))  # (an empty iterable gives None)
            position += 1
            yield out
    finally:
        for iterator in iterators:
            _close(iterator)


def _close(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()  # a prepared loader's pass ends (its workers stop)


class PreparedCombinedLoader:
    """The Trainer's training data for a :class:`CombinedLoader`: each loader prepared on its own.

    Its state is a function of the epoch and the combined position: each prepared loader's
    position follows from it (``max_size_cycle``: a loader of ``n`` batches at combined position
    ``p`` is at batch ``p % n`` of its ``p // n``-th pass after the epoch's; each pass of a prepared
    loader is shuffled as its next epoch). So the positions ``save_state`` writes per loader resume
    every loader at its next batch.
    """

    def __init__(
        self,
        combined: CombinedLoader,
        loaders: list[PreparedDataLoader],
        loop_state: LoopState,
        to_device: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    ) -> None:
        if combined.mode not in TRAIN_MODES:
            raise ValueError(
                f"fit() does not train on CombinedLoader(mode={combined.mode!r}); the training modes are "
                f"{', '.join(TRAIN_MODES)}"
            )
        self.mode = combined.mode
        self.loaders = loaders
        self._spec = combined._spec
        self._loop_state = loop_state
        self._to_device = to_device
        self._in_pass = self._at_end = False
        self._position = 0
        self._remainder: int | None = None  # (for LoopState: no duplicated samples to drop)
        # When the last pass ended: its epoch, combined position and each loader's (epoch, position)
        self._ended: tuple[int, int, list[tuple[int, int]]] | None = None

    @property
    def iterables(self) -> Any:
        """The prepared loaders, shaped as the ``CombinedLoader``'s iterables."""
        return tree_unflatten(list(self.loaders), self._spec)

    def __len__(self) -> int:
        """The mode's count of the loaders' lengths; a TypeError, as from a loader without a length,
        when a loader without one (an iterable dataset) leaves it unknown (as Lightning's, infinite:
        the epoch then ends where the mode ends, or at ``limit_train_batches`` or ``max_steps``)."""
        lengths = [_length(loader) for loader in self.loaders]
        known = [length for length in lengths if length is not None]
        if len(known) < len(lengths) and (self.mode != "min_size" or not known):
            raise TypeError(f"a CombinedLoader(mode={self.mode!r}) of a loader without a length has none")
        return _LENGTH[self.mode](known)

    def _longest(self) -> PreparedDataLoader:
        """The loader whose position is the combined position: the longest (never cycled), or the
        first without a length."""
        unsized = [loader for loader in self.loaders if _length(loader) is None]
        return unsized[0] if unsized else max(self.loaders, key=len)

    def __iter__(self) -> Iterator[Any]:
        total, longest = _length(self), self._longest()
        # Where each loader is: in its epoch's pass, or (max_size_cycle) in a later pass, started
        # again after it ran out. One loader at least is in its epoch's pass (the epoch ends when the
        # last one runs out), so the smallest epoch is the combined one; a resumed epoch ends when the
        # loaders that had not run out do (an unknown length: every loader's run out once).
        epoch = min(loader.epoch for loader in self.loaders)
        exhausted = [loader.epoch > epoch for loader in self.loaders]
        if total is None:  # the position each loader implies (a cycled stream's is in its later pass)
            start = max(
                (loader.epoch - epoch) * (_length(loader) or 0) + loader.position for loader in self.loaders
            )
        else:
            start = min(longest.position, total)
        self._in_pass, self._position, self._at_end = True, start, False
        running: list[Any] = self._loop_state.running  # (LoopState reads _at_end and _remainder)
        flat = _combine(self.mode, list(self.loaders), start, total, exhausted)
        stream: Iterable[Any] = (tree_unflatten(out, self._spec) for out in flat)
        if self._to_device is not None:  # the module's batch-transfer hooks see the combined batch
            stream = self._to_device(stream)
        try:
            for batch in stream:
                self._position += 1
                self._at_end = self._position == total
                if not running or running[-1] is not self:  # innermost: end_of_dataloader is ours
                    if self in running:
                        running.remove(self)
                    running.append(self)
                yield batch
        finally:
            self._ended = (
                epoch,
                self._position,
                [(loader.epoch, loader.position) for loader in self.loaders],
            )
            _close(stream)  # type: ignore[arg-type]
            flat.close()  # (now, not when collected: the loaders' passes end here)
            self._in_pass = self._at_end = False
            if self in running:
                running.remove(self)

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        # (the longest may be a stream started again: its epoch is a later one)
        return min(loader.epoch for loader in self.loaders)

    @property
    def position(self) -> int:
        return self._position if self._in_pass else self._longest().position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Every loader where combined position ``state["position"]`` of epoch ``state["epoch"]`` puts it."""
        epoch, position = int(state["epoch"]), int(state["position"])
        for index, loader in enumerate(self.loaders):
            length = _length(loader)
            if length is None:
                # An iterable dataset: at the combined position, read again up to it; but one started
                # again (max_size_cycle) in the pass that ended at or after that position goes back
                # to where it was in its own later pass (a pass ends so, on an exception mid-epoch).
                resumed = (epoch, position)
                ended = self._ended
                if ended is not None and ended[0] == epoch and ended[2][index][1] >= ended[1] - position >= 0:
                    ended_epoch, ended_at = ended[2][index]
                    resumed = (ended_epoch, ended_at - (ended[1] - position))
                loader.load_state_dict({**loader.state_dict(), "epoch": resumed[0], "position": resumed[1]})
                continue
            passes, at = (position // length, position % length) if length else (0, 0)
            if self.mode != "max_size_cycle":
                passes, at = 0, min(position, length)
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch + passes, "position": at})


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
