"""Per-server KV-cache pools of the path routers (spec §3): free GB of each server's pool.

Paired verbs ``can_allocate`` / ``allocate`` / ``free``; a tolerance keeps float round-off from
flipping a fit, and ``allocate`` refuses anything that does not fit, so the pool is never exceeded.
"""

from __future__ import annotations

from collections.abc import Sequence

from chainserve.plan.types import MEMORY_EPS_GB


class CachePool:
    """Free cache per server, starting from each pool's size.

    >>> pool = CachePool([1.0, 0.5])
    >>> pool.allocate(0, 0.6); pool.can_allocate(0, 0.6), pool.free_gb[0]
    (False, 0.4)
    >>> pool.free(0, 0.6); pool.can_allocate(0, 1.0)
    True
    """

    def __init__(self, capacity_gb: Sequence[float]):
        if any(c < 0 for c in capacity_gb):
            raise ValueError("capacity_gb: cache pools must be non-negative")
        self.capacity_gb = tuple(float(c) for c in capacity_gb)
        self.free_gb = list(self.capacity_gb)

    def _eps(self, server: int) -> float:
        return MEMORY_EPS_GB * max(1.0, self.capacity_gb[server])

    def can_allocate(self, server: int, gb: float) -> bool:
        return gb <= self.free_gb[server] + self._eps(server)

    def allocate(self, server: int, gb: float) -> None:
        if not self.can_allocate(server, gb):
            raise RuntimeError(f"server {server}: {gb:.6g} GB of cache requested, {self.free_gb[server]:.6g} free")
        self.free_gb[server] -= gb

    def free(self, server: int, gb: float) -> None:
        freed = self.free_gb[server] + gb
        if freed > self.capacity_gb[server] + self._eps(server):
            raise RuntimeError(f"server {server}: freeing {gb:.6g} GB it never allocated")
        self.free_gb[server] = min(freed, self.capacity_gb[server])
