"""Admission control of a block server's KV memory (paper §1: a job holds s_c·m_ij on every hop),
paged by tokens (issue 30).

The server's cache is a pool of pages (one block's K and V for ``page_tokens`` positions of one
session). A session entering the span at block b reserves, at admission, the pages its own prompt +
output need for each block b..end, or is refused: the pool never hands out more than it has, so a
backend never writes outside its preallocated memory, and no session is stopped for memory half-way.
Within that physical size the plan in force sets an admission ``limit`` in its own unit, block-slots
(one block of one job at the plan's ``max_tokens``: ``pages_per_slot`` pages; by default the whole
pool); a plan change moves the limit, never the memory, and a limit lowered below what is in use only
refuses new sessions until enough are freed (beyond the paper: adapting the plan to load). Paired
verbs ``can_allocate`` / ``allocate`` / ``free``; ``num_used`` (pages) is the server's own counter.
Free pages are handed out lowest first, so a lone session's pages are contiguous (its attention reads
them as a view).
"""

from __future__ import annotations

from chainserve.runtime.backends.base import NoFreeSlot


class KVArena:
    """Free list over ``num_block_slots × pages_per_slot`` pages, admission limit in block-slots.

    >>> arena = KVArena(5)
    >>> arena.allocate(3), arena.can_allocate(3), arena.num_used
    ([0, 1, 2], False, 3)
    >>> arena.free([1]); arena.allocate(3)
    [1, 3, 4]
    >>> arena.set_limit(2); arena.free([0, 1]); arena.can_allocate(1), arena.num_used
    (False, 3)
    >>> arena.free([2, 3]); arena.allocate(1), arena.num_used
    ([0], 2)
    >>> paged = KVArena(2, pages_per_slot=4)
    >>> paged.num_pages, paged.allocate(5), paged.used_block_slots
    (8, [0, 1, 2, 3, 4], 2)
    """

    def __init__(self, num_block_slots: int, pages_per_slot: int = 1, limit: int | None = None):
        if num_block_slots < 0 or pages_per_slot < 1:
            raise ValueError(
                f"need num_block_slots ≥ 0 and pages_per_slot ≥ 1, got {num_block_slots}, {pages_per_slot}"
            )
        self.num_block_slots, self.pages_per_slot = num_block_slots, pages_per_slot
        self.num_pages = num_block_slots * pages_per_slot
        self.limit = num_block_slots
        if limit is not None:
            self.set_limit(limit)
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low indices first
        self._used: set[int] = set()

    @property
    def num_used(self) -> int:
        """Pages in use."""
        return len(self._used)

    @property
    def used_block_slots(self) -> int:
        """Pages in use, in block-slots (rounded up)."""
        return -(-self.num_used // self.pages_per_slot)

    @property
    def limit_pages(self) -> int:
        return self.limit * self.pages_per_slot

    def set_limit(self, limit: int) -> None:
        """Admit sessions only while at most ``limit`` block-slots' pages are in use (0..num_block_slots)."""
        if not 0 <= limit <= self.num_block_slots:
            raise ValueError(f"limit: must lie in [0, {self.num_block_slots}] block-slots, got {limit}")
        self.limit = limit

    def can_allocate(self, num: int) -> bool:
        return 0 < num <= len(self._free) and self.num_used + num <= self.limit_pages

    def allocate(self, num: int) -> list[int]:
        if not self.can_allocate(num):
            raise NoFreeSlot(
                f"{num} pages requested, {self.num_used} of {self.limit_pages} in use "
                f"({self.num_pages} pages of {self.num_block_slots} block-slots)"
            )
        pages = [self._free.pop() for _ in range(num)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        stray = [page for page in pages if page not in self._used]
        if stray or len(set(pages)) != len(pages):
            raise ValueError(f"pages {stray or pages} are not allocated (or repeated)")
        self._used.difference_update(pages)
        self._free.extend(pages)
        self._free.sort(reverse=True)
