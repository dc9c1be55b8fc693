"""The collective watchdog: a collective that does not complete in time ends the run, with a report.

Each rank numbers the collective regions it enters (ember's ``all_reduce``/``all_gather``/
``broadcast``/``barrier``, ``backward`` with its gradient synchronization, DDP's forward
synchronization) in memory: a few attribute writes per region, no communication. Two threads per
rank watch them:

- a timer (every ``timeout / 10`` s, at most 2 s): when its rank has waited in one region longer
  than the timeout, it *fires*: it claims the report in the process group's store (the TCPStore
  every rank already reaches; compare-and-set, so the first rank to time out reports and a later
  one answers instead), waits briefly for the other ranks' states, prints its Python stacks, then
  a summary naming the ranks that did not reach the collective, and exits with code 1
  (``os._exit``: the main thread is blocked in C++);
- a listener (every 0.5 to 1 s, a separate thread so that a slow store never delays the timer):
  when another rank fired, it *answers*: it writes its state, prints its own Python stacks and
  exits with code 1 too, so no rank is left waiting for a dead peer.

A rank whose program ends with an exception also writes it into the store (``sys.excepthook``):
the ranks waiting in a collective for it leave at once, naming it, and a collective that fails
because that rank is gone carries a note with its exception.

Writing a store key per collective would cost a request to the store server each time, from every
rank; here the store is read once per listener poll and written only when something went wrong.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from ember._watchdog_report import EXIT_CODE as _EXIT_CODE
from ember._watchdog_report import hang_report

__all__ = ["CollectiveWatchdog", "default_store"]

_generations = itertools.count()  # every rank creates its watchdogs in the same order: same keys
# Stores of failed runs, kept so a lingering failed rank 0 (which hosts the TCPStore) still serves them.
_kept_stores: list[Store] = []


def default_store() -> Store | None:
    """The default process group's store, shared by every rank (None if there is none)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (ValueError, RuntimeError, AttributeError, KeyError):
        return None


class _Region(NamedTuple):
    number: int  # the rank's count of regions entered, this one included
    name: str
    since: float  # time.monotonic() when the rank started waiting here


class CollectiveWatchdog:
    """Watches this rank's collective regions; see the module docstring for what happens on a hang.

    Example::

        watchdog = CollectiveWatchdog(rank=0, world_size=2, timeout=600.0, store=default_store(), namespace="run-7")
        watchdog.start()
        with watchdog.region("all_reduce"):
            dist.all_reduce(tensor)
    """

    def __init__(
        self, *, rank: int, world_size: int, timeout: float, store: Store | None, namespace: str = ""
    ) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._store = store
        # ``namespace``: the same on every rank, new for each run. torchelastic keeps its store when it
        # restarts the workers (``--max-restarts``): keys of the failed attempt must not be read again.
        self._prefix = f"ember_watchdog/{namespace}/{next(_generations)}"
        # Woken often enough to fire within ~10% of the timeout; the store is read at most twice a second.
        self._poll = min(max(timeout / 10, 0.05), 2.0)
        self._store_poll = min(max(self._poll, 0.5), 1.0)
        # How long a firing rank waits for the others' states: they answer within one store poll.
        self._gather_s = min(3 * self._store_poll + 1.0, 10.0)
        self._count = 0
        self._stack: list[_Region] = []
        self._current: _Region | None = None  # the innermost open region, replaced atomically
        self._last: tuple[int, str, float] | None = None  # (count, name, time) of the last region left
        self._stopped = threading.Event()
        self._acting = threading.Lock()  # one of "fire" / "answer" / "leave" runs, once
        self._threads: list[threading.Thread] = []
        self._previous_hook: Any = None

    # -- the main thread's side -------------------------------------------------------------------
    def enter(self, name: str) -> None:
        self._count += 1
        region = _Region(self._count, name, time.monotonic())
        self._stack.append(region)
        self._current = region

    def exit(self) -> None:
        if not self._stack:
            return
        left = self._stack.pop()
        now = time.monotonic()
        self._last = (left.number, left.name, now)
        if self._stack:  # the enclosing region made progress: its clock restarts now
            self._stack[-1] = self._stack[-1]._replace(since=now)
            self._current = self._stack[-1]
        else:
            self._current = None

    def region(self, name: str) -> _Timed:
        """``with watchdog.region(name):`` times the block as region ``name``; an exception leaving it
        gets the first failed peer's report attached (:meth:`annotate`)."""
        return _Timed(self, name)

    # -- the threads ------------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._watch, name="ember-watchdog", daemon=True)]
        if self._store is not None:  # a separate thread: a slow store never delays the local timer
            self._threads.append(
                threading.Thread(target=self._listen, name="ember-watchdog-store", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        if self._store is not None:
            self._previous_hook = sys.excepthook
            sys.excepthook = self._excepthook

    def stop(self) -> None:
        self._stopped.set()
        if sys.excepthook == self._excepthook:  # (bound methods compare equal, never identical)
            sys.excepthook = self._previous_hook
        # Wait for the threads to end (they wake at once). A daemon thread still inside a store call
        # when the interpreter finalizes is killed as it takes the GIL back, through torch's C++
        # frames: std::terminate, and the process aborts after a successful run. A store call that
        # hangs (its server gone) is not waited for long.
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(timeout=self._store_poll + 2.0)
        self._threads = []

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        # Before the traceback is printed and before atexit tears the process group down: the
        # others learn it while they can still reach the store.
        self.record_failure(value)
        self._previous_hook(kind, value, tb)
        # The ranks waiting for this one read the failure within a store poll: stay that long, so
        # that they name it before a launcher, seeing this process exit, stops them.
        time.sleep(self._store_poll + 0.5)

    def record_failure(self, error: BaseException) -> None:
        """Tell the other ranks that this rank's program is ending with ``error``."""
        store = self._store
        if store is None:
            return
        _kept_stores.append(store)
        failure = {"rank": self.rank, "error": f"{type(error).__name__}: {error}"[:1000]}
        bounded(lambda: store.compare_set(self._key("failed"), "", json.dumps(failure)), 2.0)

    def peer_failure(self) -> str | None:
        """``"rank R failed with <exception>"`` if another rank's program ended with an exception."""
        store = self._store
        if store is None:
            return None
        found: list[dict[str, Any]] = []

        def read() -> None:
            if store.check([self._key("failed")]):
                found.append(json.loads(store.get(self._key("failed"))))

        bounded(read, 2.0)
        if not found or found[0]["rank"] == self.rank:
            return None
        return f"rank {found[0]['rank']} failed with {found[0]['error']}"

    def annotate(self, error: BaseException) -> None:
        """Add the first failed peer's exception to ``error`` (a collective broken by that peer's exit)."""
        failure = self.peer_failure()
        if failure is not None and hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"ember: {failure} (the cause of this error)")

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll):
            current = self._current
            if current is not None and time.monotonic() - current.since >= self.timeout:
                self._fire(current)

    def _listen(self) -> None:
        assert self._store is not None
        while not self._stopped.wait(self._store_poll):
            try:
                fired = self._store.check([self._key("fired")])
                failed = self._current is not None and self._store.check([self._key("failed")])
            except Exception:  # the store went away (a peer ended the run): nothing left to watch
                return
            if fired:
                self._answer()
            elif failed:  # waiting in a collective while a peer's program has ended
                self._leave()

    # -- firing and answering ---------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def _state(self) -> dict[str, Any]:
        now = time.monotonic()
        current, last = self._current, self._last
        state: dict[str, Any] = {"count": self._count}
        if current is not None:
            state["waiting"] = [current.number, current.name, round(now - current.since, 1)]
        if last is not None:
            state["last"] = [last[0], last[1], round(now - last[2], 1)]
        return state

    def _fire(self, region: _Region) -> None:
        if not self._acting.acquire(blocking=False):
            return
        waited = time.monotonic() - region.since
        store, states = self._store, {self.rank: self._state()}
        error: str | None = "no process group store to ask them"
        if store is not None:
            # The first rank to time out reports; a rank that times out later answers it instead.
            mine = json.dumps({"rank": self.rank, "count": region.number, "name": region.name})
            claims: list[dict[str, Any]] = []
            error = bounded(
                lambda: claims.append(json.loads(store.compare_set(self._key("fired"), "", mine))), 2.0
            )
            if claims and claims[0]["rank"] != self.rank:
                self._respond(claims[0])
        _say(
            f"rank {self.rank}: collective '{region.name}' #{region.number} has not completed after "
            f"{waited:.0f} s (collective_timeout={self.timeout:g} s); asking every rank for its state"
        )
        if error is None:
            error = bounded(lambda: self._gather(states), self._gather_s + 2.0)
        _say(f"Python stacks of rank {self.rank} (most recent call first):")
        _dump_stacks()
        report = hang_report(
            rank=self.rank, world_size=self.world_size, name=region.name, number=region.number,
            waited=waited, states=states, error=error,
        )  # fmt: skip
        _say(report)
        _exit()

    def _gather(self, states: dict[int, dict[str, Any]]) -> None:
        assert self._store is not None
        self._store.set(self._key(f"state/{self.rank}"), json.dumps(states[self.rank]))
        deadline = time.monotonic() + self._gather_s
        while len(states) < self.world_size and time.monotonic() < deadline:
            for rank in range(self.world_size):
                key = self._key(f"state/{rank}")
                if rank not in states and self._store.check([key]):
                    states[rank] = json.loads(self._store.get(key))
            time.sleep(0.05)

    def _answer(self) -> None:
        if not self._acting.acquire(blocking=False):
            return
        store, box = self._store, []
        assert store is not None
        bounded(lambda: box.append(json.loads(store.get(self._key("fired")))), 2.0)
        self._respond(box[0] if box else {"rank": "?", "name": "?", "count": "?"})

    def _respond(self, fired: dict[str, Any]) -> None:
        """Another rank reports the hang: give it this rank's state and stacks, then exit."""
        store = self._store
        assert store is not None
        bounded(lambda: store.set(self._key(f"state/{self.rank}"), json.dumps(self._state())), 2.0)
        _say(
            f"rank {self.rank}: the collective watchdog fired on rank {fired['rank']} "
            f"('{fired['name']}' #{fired['count']} timed out). Python stacks of rank {self.rank}:"
        )
        _dump_stacks()
        # The reporting rank reads every state within _gather_s, and the store may live in this
        # process (rank 0): stay until it is done.
        time.sleep(self._gather_s + 1.0)
        _say(f"rank {self.rank}: exiting with code {_EXIT_CODE} (collective watchdog)")
        _exit()

    def _leave(self) -> None:
        failure, current = self.peer_failure(), self._current
        if failure is None or current is None or not self._acting.acquire(blocking=False):
            return
        _say(
            f"rank {self.rank}: {failure} while this rank waited in '{current.name}' #{current.number}; "
            f"exiting with code {_EXIT_CODE}"
        )
        _exit()


def bounded(work: Callable[[], object], seconds: float) -> str | None:
    """Run ``work`` in a helper thread for at most ``seconds`` (a store call can block); the error, if any."""
    errors: list[str] = []

    def run() -> None:
        try:
            work()
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=run, name="ember-watchdog-io", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return "the process group's store did not respond"
    return errors[0] if errors else None


def _dump_stacks() -> None:
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # sys.stderr replaced by an object without a file
        descriptor = 2
    faulthandler.dump_traceback(file=descriptor, all_threads=True)


def _say(message: str) -> None:
    print(f"ember: {message}", file=sys.stderr, flush=True)


def _exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_CODE)


class _Timed:
    """The context manager of :meth:`CollectiveWatchdog.region`: a plain object, not a generator,
    because one wraps every synchronizing backward."""

    __slots__ = ("_name", "_watchdog")

    def __init__(self, watchdog: CollectiveWatchdog, name: str) -> None:
        self._watchdog, self._name = watchdog, name

    def __enter__(self) -> None:
        self._watchdog.enter(self._name)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if isinstance(error, Exception):  # e.g. gloo's "Connection closed by peer": name the peer that failed
            self._watchdog.annotate(error)
        self._watchdog.exit()
