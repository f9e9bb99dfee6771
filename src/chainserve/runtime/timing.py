"""Sleeps that last as long as asked, on average (for injected delays and emulated compute, §4.2).

asyncio wakes a timer up to a millisecond late (epoll's timeout is rounded up to whole ms, then the
process must be scheduled): a 5 ms sleep lasts ~5.6 ms here. Emulated servers and injected network
delays would then all run slow, and a benchmark would count the timer's lateness as overhead.
:class:`SteadySleep` learns its mean lateness and starts each sleep that much earlier.
"""

from __future__ import annotations

import asyncio
import time

#: Weight of the newest measurement in the running correction.
GAIN = 0.1
#: The correction never exceeds this (s): asyncio is never that late on a healthy machine.
MAX_CORRECTION_S = 0.002


class SteadySleep:
    """``await sleeper(seconds)``: sleep ``seconds`` minus the learnt lateness (never below zero).

    >>> sleeper = SteadySleep()
    >>> asyncio.run(sleeper(0.0)), sleeper.correction_s
    (None, 0.0)
    """

    def __init__(self) -> None:
        self.correction_s = 0.0

    async def __call__(self, seconds: float) -> None:
        if seconds <= 0:
            return
        began = time.perf_counter()
        await asyncio.sleep(max(0.0, seconds - self.correction_s))
        late = time.perf_counter() - began - seconds
        self.correction_s = min(max(self.correction_s + GAIN * late, 0.0), MAX_CORRECTION_S)
