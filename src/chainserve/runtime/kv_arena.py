"""Admission control of a block server's KV memory (paper §1: a job holds s_c·m_ij on every hop).

The server's cache is an arena of block-slots (one block of one session, sized for ``max_tokens``).
A session entering the span at block b takes one block-slot per block b..end, or is refused: the
arena never hands out more than it has, so a backend never writes outside its preallocated memory.
Paired verbs ``can_allocate`` / ``allocate`` / ``free``; ``num_used`` is the server's own counter.
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
    """

    def __init__(self, num_block_slots: int):
        if num_block_slots < 0:
            raise ValueError(f"num_block_slots: must be non-negative, got {num_block_slots}")
        self.num_block_slots = num_block_slots
        self._free = list(range(num_block_slots - 1, -1, -1))  # pop() hands out low indices first
        self._used: set[int] = set()

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num: int) -> bool:
        return 0 < num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        if not self.can_allocate(num):
            raise NoFreeSlot(f"{num} block-slots requested, {len(self._free)} of {self.num_block_slots} free")
        slots = [self._free.pop() for _ in range(num)]
        self._used.update(slots)
        return slots

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise ValueError(f"block-slot {slot} is not allocated")
            self._used.remove(slot)
            self._free.append(slot)
