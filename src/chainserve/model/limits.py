"""The meaningful range of every number a user gives (cluster files and command-line flags).

Inside these ranges plans and simulations are right; outside them float arithmetic stops being
(10^308 GB overflows c_max, a rate of 10^-17/s puts arrivals 10^17 s apart, where a 12 s service
time is below the clock's resolution) or the work explodes (10^8 servers or blocks). Values outside
are refused with a :class:`SpecError` naming the field and the range.

==================================  ===============================  ==============================
quantity                            fields                           range
==================================  ===============================  ==============================
time (seconds)                      τ^p, τ^c, RTT (τ^c, RTT may be   1e-6 .. 1e6 s
                                    exactly 0)
rate (requests/s)                   arrival_rate, ``--rate``         1e-6 .. 1e6 /s
memory (GB)                         memory_gb, block_size_gb,        1e-9 .. 1e6 GB
                                    cache_size_gb
design load ρ̄                       rho_bar, ``--rho-bar``           0.001 .. 0.999
servers J (all entries together)    count, servers                   1 .. 1000
model blocks L                      num_blocks                       1 .. 1000
tokens                              prompt/output/max_tokens         1 .. 1 000 000
==================================  ===============================  ==============================

J and L bound the planner's work (a c-search is O(c-range · J log J) plus GCA's O(J·L) per chain);
the c range itself is capped in :mod:`chainserve.plan.csearch`.
"""

from __future__ import annotations

import math

from chainserve.model.spec import SpecError

TIME_S = (1e-6, 1e6)
RATE_PER_S = (1e-6, 1e6)
MEMORY_GB = (1e-9, 1e6)
RHO_BAR = (1e-3, 0.999)
MAX_SERVERS = 1000
MAX_BLOCKS = 1000
MAX_TOKENS = 1_000_000


def check_range(
    field: str, value: float, bounds: tuple[float, float], unit: str = "", allow_zero: bool = False
) -> float:
    """``value`` when it is a finite number in ``bounds`` (or exactly 0 with ``allow_zero``); else a
    :class:`SpecError` naming ``field`` and the range.

    >>> check_range("rate", 2.5, RATE_PER_S, "/s")
    2.5
    >>> check_range("rate", 1e-17, RATE_PER_S, "/s")
    Traceback (most recent call last):
    ...
    chainserve.model.spec.SpecError: rate: must lie in 1e-06..1e+06 /s, got 1e-17
    """
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise SpecError(field, f"must be a number, got {value!r}")
    if (allow_zero and value == 0) or low <= value <= high:
        return value
    zero = "0 or " if allow_zero else ""
    raise SpecError(field, f"must lie in {zero}{low:g}..{high:g}{' ' + unit if unit else ''}, got {value!r}")


def check_count(field: str, value: int, high: int, what: str = "") -> int:
    """``value`` when it is an integer in 1..``high``; else a :class:`SpecError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise SpecError(field, f"must be an integer in 1..{high}{' ' + what if what else ''}, got {value!r}")
    return value
