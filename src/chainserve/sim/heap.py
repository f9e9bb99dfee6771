"""The simulator's event heap (issue 31): one heap for the event kinds of the loop (:mod:`.loop`).
Entries ``(time, kind, seq, who, payload)`` run in that order: at equal times by kind, then in the
order they were pushed. The batched service's events (iteration ends, replies, iteration starts)
have a heap of their own in its compiled core (:mod:`.batched_core`), ranked after the loop's kinds
of their instant; the loop runs them up to its next event."""

from __future__ import annotations

from heapq import heappush


class EventHeap:
    """``entries``: the heap itself (the loop peeks at ``entries[0]`` and pops it)."""

    __slots__ = ("entries", "seq")

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, int, int, object]] = []
        self.seq = 0

    def push(self, t: float, kind: int, who: int, payload: object) -> int:
        """A new event, after every event pushed so far of its time and kind; returns its ``seq``."""
        self.seq += 1
        heappush(self.entries, (t, kind, self.seq, who, payload))
        return self.seq
