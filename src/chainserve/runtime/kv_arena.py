"""Admission control of a block server's KV memory (paper §1: a job holds s_c·m_ij on every hop).

The server's cache is an arena of block-slots (one block of one session, sized for ``max_tokens``).
A session entering the span at block b takes one block-slot per block b..end, or is refused: the
arena never hands out more than it has, so a backend never writes outside its preallocated memory.
Within that physical size the plan in force sets an admission ``limit`` (its reservation Σ_k c_k·m_ij,
by default the whole arena); a plan change moves the limit, never the memory, and a limit lowered
below what is in use only refuses new sessions until enough are freed (beyond the paper: adapting
the plan to load). Paired verbs ``can_allocate`` / ``allocate`` / ``free``; ``num_used`` is the
server's own counter.
"""

from __future__ import annotations

from chainserve.runtime.backends.base import NoFreeSlot


class KVArena:
    """Free list over ``num_block_slots`` block-slots.

    >>> arena = KVArena(5)
    >>> arena.allocate(3), arena.can_allocate(3), arena.num_used
    ([0, 1, 2], False, 3)
    >>> arena.free([1]); arena.allocate(3)
    [1, 3, 4]
    >>> arena.set_limit(2); arena.free([0, 1]); arena.can_allocate(1), arena.num_used
    (False, 3)
    >>> arena.free([2, 3]); arena.allocate(1), arena.num_used
    ([3], 2)
    """

    def __init__(self, num_block_slots: int, limit: int | None = None):
        if num_block_slots < 0:
            raise ValueError(f"num_block_slots: must be non-negative, got {num_block_slots}")
        self.num_block_slots = num_block_slots
        self.limit = num_block_slots
        if limit is not None:
            self.set_limit(limit)
        self._free = list(range(num_block_slots - 1, -1, -1))  # pop() hands out low indices first
        self._used: set[int] = set()

    @property
    def num_used(self) -> int:
        return len(self._used)

    def set_limit(self, limit: int) -> None:
        """Admit sessions only while at most ``limit`` block-slots are in use (0..num_block_slots)."""
        if not 0 <= limit <= self.num_block_slots:
            raise ValueError(f"limit: must lie in [0, {self.num_block_slots}] block-slots, got {limit}")
        self.limit = limit

    def can_allocate(self, num: int) -> bool:
        return 0 < num <= len(self._free) and self.num_used + num <= self.limit

    def allocate(self, num: int) -> list[int]:
        if not self.can_allocate(num):
            raise NoFreeSlot(
                f"{num} block-slots requested, {self.num_used} of {self.limit} in use (arena of {self.num_block_slots})"
            )
        slots = [self._free.pop() for _ in range(num)]
        self._used.update(slots)
        return slots

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise ValueError(f"block-slot {slot} is not allocated")
            self._used.remove(slot)
            self._free.append(slot)
