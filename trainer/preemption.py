"""Pre-emption: SIGTERM or SIGUSR1 during ``fit`` ends the fit at the next step boundary, with a checkpoint.

Schedulers announce the end of a job with a signal some time before they kill it: SLURM's
``#SBATCH --signal=USR1@90``, SIGTERM before SIGKILL (SLURM, Kubernetes), torchrun's SIGTERM to the
workers of a group it stops. During ``Trainer.fit``:

1. the handler only records the signal. It runs between two bytecodes of the main thread, in the
   middle of a step, where nothing consistent can be saved;
2. at a step boundary (after a batch that stepped the optimizer, and the validation that follows
   it; and after each epoch's end) the processes combine their flags with an all-reduce "max", so
   they all stop at the same step, even when the signal reached only some of them. Several
   processes agree about every half second (``EMBER_PREEMPTION_AGREE_SECONDS``; ``0``: at every
   boundary), not at every boundary, so short steps pay no collective each: the stop comes about
   a second after the signal;
3. they save the ``last`` checkpoint of the ModelCheckpoint's directory together, and ``fit`` raises
   :class:`Preempted` (a ``SystemExit`` with status 75). The next run resumes with
   ``fit(ckpt_path="last")``, or by itself after a restart (``Trainer(auto_resume=...)``).

The handlers are installed in the main thread only, for the duration of ``fit``, and the previous
ones are put back afterwards.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ember.strategies.environment import preemption_agree_seconds
from ember.trainer import checkpointing

if TYPE_CHECKING:
    from ember.accelerator import Accelerator
    from ember.trainer.trainer import Trainer

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPTION_SIGNALS", "Preempted"]

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": not 0, so that
# torchrun (which restarts only failed groups) and workflow tools do not take a half-trained run for
# a finished one; not 1 or 128+signal, so that a job script can tell "saved, resume me" from a crash.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """``Trainer.fit`` stopped for a pre-emption signal, after saving ``checkpoint``.

    Uncaught, it ends the script like ``sys.exit(75)``: ``finally`` blocks and ``atexit`` handlers
    run, and no traceback is printed. Catch it to exit differently::

        try:
            trainer.fit(module, loader)
        except Preempted as stop:
            print(f"stopped by {stop.signal.name} at step {stop.global_step}: {stop.checkpoint}")
            raise SystemExit(0) from None
    """

    def __init__(self, signum: int, checkpoint: Path | None, global_step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal = signal.Signals(signum)
        self.checkpoint = checkpoint  # None: no ModelCheckpoint, nothing was saved
        self.global_step = global_step


class _SignalCatcher:
    """Records the first pre-emption signal while installed; restores the previous handlers on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self.sigterm = False  # SIGTERM came (first or not): Trainer.received_sigterm
        self.acted = False  # the fit stopped for it (else it is passed on when the fit ends)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        self.received, self.sigterm, self.acted = None, False, False
        if threading.current_thread() is not threading.main_thread():
            return self  # Python runs handlers in the main thread only: a fit elsewhere is not pre-emptible
        for signum in self.signals:
            previous = signal.getsignal(signum)
            # SIG_IGN: the process was told to ignore this signal, and keeps doing so. None: a handler
            # installed outside Python, which could not be put back.
            if previous is signal.SIG_IGN or previous is None:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        self.sigterm = self.sigterm or signum == signal.SIGTERM
        previous = self._previous.get(signum)
        if callable(previous):  # a Python handler installed before the fit still runs (chained)
            previous(signum, frame)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        previous_of_received = self._previous.get(self.received) if self.received is not None else None
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:  # unless someone replaced ours meanwhile
                signal.signal(signum, previous)
        self._previous = {}
        # A signal that came after the last step boundary of a fit that ended normally was not acted
        # on: with the default disposition, deliver it again now, so the process ends as it would have
        # without the fit in the way. (A Python handler already ran; an exception propagating is the
        # more useful report, so it is left alone.)
        if (
            self.received is not None
            and not self.acted
            and kind is None
            and previous_of_received is signal.SIG_DFL
        ):
            signal.raise_signal(self.received)


_AGREE_SECONDS = 0.5  # the default interval between two agreements of several processes
_MAX_INTERVAL = 10_000  # boundaries between two agreements, at most


class PreemptionGuard:
    """The Trainer's pre-emption handling: the signal catcher, and the agreement at step boundaries."""

    def __init__(self) -> None:
        self.catcher = _SignalCatcher()  # catcher.received: the signal this process got, or None
        self._pending: Callable[[], torch.Tensor] | None = None  # the all-reduce started last
        self._seconds = _AGREE_SECONDS  # wanted time between two agreements
        self._boundaries = 0  # step boundaries of this fit so far: the same count on every process
        self._interval = 1  # agree at every `_interval`-th boundary
        self._first = 0.0  # time.monotonic() at the first boundary

    @contextmanager
    def during_fit(self) -> Iterator[None]:
        self._pending = None
        self._seconds, self._boundaries, self._interval = preemption_agree_seconds(_AGREE_SECONDS), 0, 1
        try:
            with self.catcher:
                yield
        finally:
            self._pending = None

    def stop_if_signalled(self, trainer: Trainer) -> None:
        """At a step boundary: when a process got a signal, every process saves ``last`` and raises."""
        signum = self._agreed_signal(trainer.accelerator)
        if not signum:
            return
        self.catcher.acted = True
        path = checkpointing.save_last(trainer)
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            where = f"saved {path}" if path is not None else "no ModelCheckpoint, nothing saved"
            print(
                f"ember: pre-empted by {name} at step {trainer.global_step}: {where}; "
                f"exiting with status {PREEMPTED_EXIT_CODE}",
                file=sys.stderr,
                flush=True,
            )
        raise Preempted(signum, path, trainer.global_step)

    def _agreed_signal(self, accelerator: Accelerator) -> int:
        """The largest signal number any process had received at the last agreement, the same on
        every process (0: none).

        Every process calls this at the same boundaries, so the all-reduces pair up. An agreement
        starts the all-reduce of this process's flag without waiting for it and reads the one
        started at the previous agreement: by then it has long finished (gloo runs it on its own
        thread, an accelerator on the device), so no boundary waits for the other processes or
        stalls the host. The processes agree at every ``_interval``-th boundary, which aims at
        one agreement per ``EMBER_PREEMPTION_AGREE_SECONDS``: each all-reduce also carries the
        process's mean time per boundary, and the largest sets the interval, the same everywhere.
        The stop comes one agreement after the signal, at the same boundary on every process.
        """
        local = self.catcher.received or 0
        if accelerator.num_processes == 1:
            return local
        self._boundaries += 1
        if self._boundaries == 1:
            self._first = time.monotonic()
        if self._boundaries % self._interval:
            return 0
        if self._pending is not None:
            signum, seconds = self._pending().tolist()
            self._pending = None
            if signum:
                return int(signum)
            if seconds > 0 and self._seconds > 0:
                self._interval = max(1, min(_MAX_INTERVAL, int(self._seconds / seconds)))
        elapsed = time.monotonic() - self._first
        per_boundary = elapsed / (self._boundaries - 1) if self._boundaries > 1 else 0.0
        # Built on the host and copied: an agreement is rare enough for one small copy.
        flag = torch.tensor([float(local), per_boundary], dtype=torch.float64).to(accelerator.device)
        self._pending = accelerator.strategy.start_all_reduce(flag, "max")
        return 0
