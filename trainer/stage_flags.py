"""What the Trainer runs now (its stage flags), and the copy of it in ``trainer.state``: Lightning's
``trainer.state.fn`` / ``stage`` / ``status``, written into the :class:`LoopState` each time a flag
changes, so that the state holds no reference back to the Trainer."""

from __future__ import annotations

from ember.trainer.state import LoopState

__all__ = ["StageFlags"]


class StageFlags:
    """Mixed into the Trainer through ``TrainerProperties``: each flag is a property whose setter
    brings ``trainer.state``'s ``fn``, ``stage`` and ``status`` up to date. The flags change a few
    times a stage (never per batch), so the writes cost nothing that matters."""

    state: LoopState  # the loop's counters: a plain attribute the Trainer sets (read every batch)
    # Their values; class attributes are the values before the Trainer's __init__ sets them.
    _stage_now = ""  # trainer.stage
    _running_now = ""  # the stage running now ("fit", "validate", "test", "predict"), "" between stages
    _evaluation_now = ""  # the evaluation pass running now ("validation", "test"), "" otherwise
    _sanity_now = False
    _interrupted_now = False

    @property
    def stage(self) -> str:
        """The running (or last) entry point: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``;
        ``""`` before the first."""
        return self._stage_now

    @stage.setter
    def stage(self, stage: str) -> None:
        self._stage_now = stage
        self._publish_status()

    @property
    def sanity_checking(self) -> bool:
        """The sanity check of ``fit`` is running (Lightning's flag)."""
        return self._sanity_now

    @sanity_checking.setter
    def sanity_checking(self, on: bool) -> None:
        self._sanity_now = on
        self._publish_status()

    @property
    def _running(self) -> str:
        return self._running_now

    @_running.setter
    def _running(self, stage: str) -> None:
        self._running_now = stage
        self._publish_status()

    @property
    def _evaluation(self) -> str:
        return self._evaluation_now

    @_evaluation.setter
    def _evaluation(self, prefix: str) -> None:
        self._evaluation_now = prefix
        self._publish_status()

    @property
    def _interrupted(self) -> bool:
        return self._interrupted_now

    @_interrupted.setter
    def _interrupted(self, interrupted: bool) -> None:
        self._interrupted_now = interrupted
        self._publish_status()

    def _publish_status(self) -> None:
        """Write the flags into ``trainer.state`` (called again by whoever replaces the state)."""
        state: LoopState | None = self.__dict__.get("state")  # (a plain attribute: read every batch)
        if state is None:  # (the Trainer's __init__, before it made its state)
            return
        running, evaluation, sanity = self._running_now, self._evaluation_now, self._sanity_now
        # The first flag on, in this order (Lightning's RunningStage): ``trainer.training`` ... as read.
        if sanity:
            stage = "sanity_check"
        elif evaluation == "validation" or running == "validate":
            stage = "validate"
        elif running in ("test", "predict"):
            stage = running
        elif running == "fit" and not evaluation:
            stage = "train"
        else:
            stage = None
        state.fn = self._stage_now or None
        state.stage = stage
        if state.fn is None:
            state.status = "initializing"
        elif self._interrupted_now:  # (from on_exception on, as Lightning's)
            state.status = "interrupted"
        else:
            state.status = "running" if stage is not None else "finished"
