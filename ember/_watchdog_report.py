"""The summary the collective watchdog (:mod:`ember._watchdog`) prints when a collective times out:
which ranks did not reach it, and where each of them was."""

from __future__ import annotations

from typing import Any

__all__ = ["EXIT_CODE", "hang_report"]

#: The exit code of every rank the watchdog ends.
EXIT_CODE = 1


def hang_report(
    *,
    rank: int,
    world_size: int,
    name: str,
    number: int,
    waited: float,
    states: dict[int, dict[str, Any]],
    error: str | None,
) -> str:
    """The report of ``rank``, whose collective ``name`` #``number`` timed out after ``waited`` s:
    ``states`` are the ranks' answers (``CollectiveWatchdog._state``), ``error`` why some are missing."""
    lines = []
    missing = [r for r in range(world_size) if r not in states]
    # A rank waiting in a region of the same name reached it (its count may differ: ranks need
    # not run the same number of forward passes); any other rank is elsewhere.
    behind = [
        r
        for r, state in sorted(states.items())
        if r != rank and ("waiting" not in state or state["waiting"][1] != name)
    ]
    for other_rank, state in sorted(states.items()):
        if other_rank == rank:
            continue
        if "waiting" in state:
            count, where, seconds = state["waiting"]
            other = "" if where == name else ": a different collective (one skipped or added on some rank?)"
            lines.append(f"  rank {other_rank}: waiting in '{where}' #{count} for {seconds:g} s{other}")
        elif "last" in state:
            count, where, seconds = state["last"]
            lines.append(
                f"  rank {other_rank}: not in a collective; it left '{where}' #{count} {seconds:g} s ago"
            )
        else:
            lines.append(f"  rank {other_rank}: has not entered any collective yet")
    if missing and world_size > 1:
        reason = f" ({error})" if error else ""
        lines.append(f"  ranks {missing}: did not answer{reason}: dead, or their Python threads are blocked")
    head = (
        f"collective '{name}' #{number} timed out after {waited:.0f} s on rank {rank}; "
        f"ranks that did not reach it: {behind}"
        + (f", no answer from {missing}" if missing and world_size > 1 else "")
    )
    tail = f"Python stacks: above, one block per rank. Exiting with code {EXIT_CODE}."
    return "\n".join([head, *lines, tail])
