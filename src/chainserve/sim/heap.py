"""The simulator's event heap (issue 31): one heap for every event kind of the loop (:mod:`.loop`)
and of its service components (:mod:`.batched`). Entries ``(time, kind, seq, who, payload)`` run in
that order: at equal times by kind, then in the order they were pushed. A component may reserve a
place in that order now and push its event there later — or never, when the event would do nothing
(:meth:`reserve`, :meth:`push_at`); one that knows what it would do now may do it at once when
nothing else comes first (:meth:`quiet`)."""

from __future__ import annotations

import math
from heapq import heappush


class EventHeap:
    """``entries``: the heap itself (the loop peeks at ``entries[0]`` and pops it); ``arrival_t``:
    the time of the loop's next arrival (its pre-drawn stream merges with the heap there)."""

    __slots__ = ("entries", "seq", "arrival_t")

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, int, int, object]] = []
        self.seq = 0
        self.arrival_t = math.inf

    def quiet(self, t: float) -> bool:
        """Whether no event and no arrival remains at ``t`` or earlier."""
        return self.arrival_t > t and (not self.entries or self.entries[0][0] > t)

    def push(self, t: float, kind: int, who: int, payload: object) -> int:
        """A new event, after every event pushed so far of its time and kind; returns its ``seq``."""
        self.seq += 1
        heappush(self.entries, (t, kind, self.seq, who, payload))
        return self.seq

    def reserve(self) -> int:
        """A ``seq`` for an event that :meth:`push_at` may push later, ordered as if pushed now."""
        self.seq += 1
        return self.seq

    def push_at(self, t: float, kind: int, seq: int, who: int, payload: object) -> None:
        """The event of a :meth:`reserve`\\ d ``seq``."""
        heappush(self.entries, (t, kind, seq, who, payload))
