"""Output of the baselines without chains (spec §3): a placement plus the KV-cache pool of each server.

PETALS and BPRR do not form server chains or reserve cache per chain. A request picks a path of
(server, blocks) hops when it arrives and holds ``s_c,j × (blocks it runs there)`` of the server's cache
pool for its whole life; the pool is the memory a server set aside for attention caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chainserve.model.spec import Problem
from chainserve.plan.types import MEMORY_EPS_GB, Chain, Placement, check_placement


@dataclass(frozen=True, slots=True)
class PathPlacement:
    """A placement for per-request path routing (a :class:`~chainserve.plan.types.Layout`).

    ``cache_gb[j]``: the cache pool of server j (index into ``problem.servers``; 0 for servers that
    host nothing). ``method``: which baseline made it; ``notes``: its parameters in words.
    """

    problem: Problem
    placement: Placement
    cache_gb: tuple[float, ...]
    method: str
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.cache_gb) != self.problem.num_servers:
            raise ValueError(
                f"cache_gb: need one pool per server ({self.problem.num_servers}), got {len(self.cache_gb)}"
            )
        if any(c < 0 for c in self.cache_gb):
            raise ValueError("cache_gb: pools must be non-negative")

    def reservation_by_server(self) -> dict[int, float]:
        """The cache pool of each placed server, GB (:class:`~chainserve.plan.types.Layout`)."""
        return {span.server: self.cache_gb[span.server] for span in self.placement.spans}

    @property
    def chains(self) -> tuple[Chain, ...]:
        """Always empty: requests get paths, not chains (so code reading a plan's chains, e.g. for
        per-chain utilisation, treats both layouts alike)."""
        return ()

    def check(self) -> None:
        """Raise ``ValueError`` unless spans are valid, blocks 1..L are all hosted, and parameters
        plus the cache pool fit every server's memory."""
        problem, placement = self.problem, self.placement
        check_placement(problem, placement)
        covered = {b for s in placement.spans for b in range(s.start_block, s.end_block + 1)}
        missing = sorted(set(range(1, placement.num_blocks + 1)) - covered)
        if missing:
            raise ValueError(f"placement: blocks {missing} are hosted by no server")
        placed = set(placement.servers)
        for j, server in enumerate(problem.servers):
            span = placement.span_of(j)
            params_gb = problem.block_size_gb(j) * span.num_blocks if span is not None else 0.0
            if j not in placed and self.cache_gb[j] > 0:
                raise ValueError(f"cache_gb: server {server.name} hosts nothing but has a cache pool")
            if params_gb + self.cache_gb[j] > server.memory_gb + MEMORY_EPS_GB * max(1.0, server.memory_gb):
                raise ValueError(f"server {server.name}: blocks plus cache pool exceed its memory")
