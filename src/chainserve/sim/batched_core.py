"""The compiled core of the iteration-level model (issue 31, "One simulator": the batched model within
10x of the job-level one per job): :mod:`.batched`'s stations, queues, iterations and replies as
numba-jitted code over arrays, with an event heap of its own, so that Python and the core cross
O(1) times per job (:class:`~chainserve.sim.batched_process.BatchedProcess`: ``start``, ``abort``,
``advance``). The jitted
functions allocate nothing and run without reference counting (``_nrt=False``); they are cached
(``cache=True``: numba's cache beside this file, or ``~/.cache/chainserve/numba`` when the package
is read-only and ``NUMBA_CACHE_DIR`` is not set). Like all numba code its array accesses are not bounds-checked;
the three stores that grow (the heap, the step slots, the starts due) check their room and raise
``RuntimeError`` rather than write past it.

The model is the one :mod:`.batched` documents, float for float the Python model it replaced. Its
events, in the loop's order at equal times (:mod:`.loop`): an iteration ends (:data:`ITEM_END`), a
batch's replies reach the orchestrator (:data:`REPLY`), the loop's arrivals (:data:`ARRIVAL`, a rank
only), an iteration starts (:data:`ITER`); then by ``seq``, the order they were pushed in, or the
place a start reserved when the station's previous iteration began. The loop's own events
(failures, returns, loads, ticks) rank before all of them at their instant. The starts due, all of
one instant, wait in ``calls`` beside the heap; a free iteration whose end comes next is over at
once; a head batch that finishes a job is handed out across two calls of ``advance``.

With ``hosts`` (processor sharing, :class:`~chainserve.sim.batched.BatchedService`) an iteration's
end is pushed again whenever the number of iterations in progress on its host changes
(:func:`_share`); ``S_END_SEQ`` tells the live end event from the stale ones.

Twins: :func:`take_batch_mask` and :func:`iteration_s` are the compiled forms of
:func:`chainserve.model.step_cost.take_batch` and :meth:`chainserve.model.step_cost.StepCost.iteration_s`,
which stay the definition (``tests/test_batched_core.py`` pins them bit for bit); the core takes
every batch of two or more waiting steps and costs every iteration with them.

State (every array is allocated by :class:`~chainserve.sim.batched_process.BatchedProcess`, which
grows the slot pool when aborts leave stale steps in flight):

* ``jobs[i]``: steps left, hop, prompt tokens left on this hop, attempt, route offset and length in
  ``routes``, prompt and output tokens, the slot of its step waiting in a queue (−1: none);
* ``st_i[j]`` / ``st_f[j]`` per station (servers, then the head): state, the ``seq`` reserved for
  its next start, queue head and tail, whether it has a step cost, the ``seq`` of its live end
  event, its host, whether it shares the host now, its running batch, and (a column of its own)
  the stations in host order / that start's time, the communication and lone-step seconds, the
  cost coefficients α, β, α', β', the work its iteration has left at full speed;
* ``host_i[h]`` / ``host_f[h]`` per host: iterations in progress, its stations in ``S_MEMBER`` /
  cores, the time work was last counted;
* ``slots``: steps (job, tokens, blocks, attempt, next, prev), linked into a station's queue, a
  running batch or a reply; the free ones form a list;
* ``heap_t`` / ``heap_k``: the event heap (time; rank and seq, station and first slot of its batch);
* ``calls``: the starts due (seq, station);
* ``glob`` / ``glob_f``: counters (:data:`G_SEQ` …) and times (:data:`F_ITER_T` …).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
    # a read-only install: cache the compiled core per user (a user's own NUMBA_CACHE_DIR wins)
    os.environ["NUMBA_CACHE_DIR"] = str(Path.home() / ".cache" / "chainserve" / "numba")
    if "numba" in sys.modules:  # imported already: its config read the environment then
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

#: Event ranks at equal times (the loop's own kinds, 0 to 4, come first).
ITEM_END, REPLY, ARRIVAL, ITER = 5, 6, 7, 8
#: A station's state: no iteration and none due; an iteration runs; its next start is due (``calls``);
#: an iteration ended with nothing waiting (its next start's place is reserved, unused).
IDLE, RUNNING, CALLED, FREE = range(4)
#: The heap's keys: (rank, seq) and (station, slot + 1) in one int64 each.
_SEQ_BITS, _SLOT_BITS = 56, 40
_SEQ_MASK, _SLOT_MASK = (1 << _SEQ_BITS) - 1, (1 << _SLOT_BITS) - 1
#: Columns of ``jobs``.
J_STEPS, J_HOP, J_TOKENS, J_ATTEMPT, J_ROUTE, J_HOPS, J_PROMPT, J_OUTPUT, J_QSLOT = range(9)
#: Columns of ``st_i`` and ``st_f``.
S_STATE, S_START_SEQ, S_QHEAD, S_QTAIL, S_COSTED, S_END_SEQ, S_HOST, S_SHARING, S_BATCH, S_MEMBER = range(10)
S_START_T, S_COMM, S_LONE, S_ALPHA, S_BETA, S_PALPHA, S_PBETA, S_WORK = range(8)
#: Columns of ``host_i`` and ``host_f`` (processor sharing): iterations in progress, the host's first
#: station in ``st_i[:, S_MEMBER]`` and its number of stations / cores, the time work was last counted.
H_BUSY, H_FIRST, H_SIZE = range(3)
H_CORES, H_SINCE = range(2)
#: Columns of ``slots``.
L_JOB, L_TOKENS, L_BLOCKS, L_ATTEMPT, L_NEXT, L_PREV = range(6)
#: ``glob``: the seq counter, heap size, free-slot list, the latest start run's seq, the prefill
#: chunk, the token budget, the head's station, a head batch being handed out (station, next slot;
#: −1: none), the fewest tokens a waiting step has (a batch is full when no more fit: 1, or 0 when a
#: prompt has no tokens), the number of starts due (``calls``), and whether hosts are shared.
G_SEQ, G_HEAP, G_FREE, G_ITER_SEQ, G_CHUNK, G_BUDGET, G_HEAD, G_PEND_ST, G_PEND_SLOT, G_LEAST, G_NCALLS, G_SHARED = (
    range(12)
)
#: ``glob_f``: the latest start run's time, the time of the event being handled, the starts' instant.
F_ITER_T, F_NOW, F_CALLS_T = range(3)


@njit(cache=True, inline="always", _nrt=False)
def take_batch_mask(tokens, count, budget, least, taken):
    """:func:`~chainserve.model.step_cost.take_batch` on ``tokens[:count]`` (the waiting items'
    tokens, oldest first; none under ``least``): the oldest item always, then each later one that
    still fits ``budget``; ``taken[x]`` = 1 for the batch, 0 for the rest; returns the batch size.
    It stops looking once no item of ``least`` tokens fits any more."""
    used = 0
    k = 0
    for x in range(count):
        taken[x] = 0
    for x in range(count):
        if k > 0 and budget - used < least:
            break
        c = tokens[x]
        if k == 0 or used + c <= budget:
            taken[x] = 1
            used += c
            k += 1
    return k


@njit(cache=True, inline="always", _nrt=False)
def iteration_s(blocks, tokens, count, alpha, beta, palpha, pbeta):
    """:meth:`~chainserve.model.step_cost.StepCost.iteration_s` of the items (``blocks[x]``,
    ``tokens[x]``), ``x < count``, in the same operation order (the same float)."""
    most = 0.0
    decode = 0.0
    prefill = 0.0
    has_decode = False
    has_prefill = False
    for x in range(count):
        m = blocks[x]
        q = tokens[x]
        if m > most:
            most = float(m)
        if q <= 1:
            has_decode = True
            decode = decode + m * beta
        else:
            has_prefill = True
            prefill = prefill + (m * q) * pbeta
    a = alpha if has_decode else 0.0
    b = palpha if has_prefill else 0.0
    fixed = b if b > a else a
    return most * fixed + decode + prefill


@njit(cache=True, _nrt=False)
def _compact(st_i, heap_t, heap_k, glob):
    """Drops the stale iteration ends (processor sharing moved them; their station's ``S_END_SEQ``
    names a later one) and rebuilds the heap. The live events always fit: a reply per slot, an
    end per station."""
    m = 0
    for x in range(glob[G_HEAP]):
        key, payload = heap_k[x, 0], heap_k[x, 1]
        if (key >> _SEQ_BITS) == ITEM_END and (key & _SEQ_MASK) != st_i[payload >> _SLOT_BITS, S_END_SEQ]:
            continue
        heap_t[m], heap_k[m, 0], heap_k[m, 1] = heap_t[x], key, payload
        m += 1
    glob[G_HEAP] = m
    for top in range((m - 2) // 2, -1, -1):  # sift each parent down, the last first
        t, k, p = heap_t[top], heap_k[top, 0], heap_k[top, 1]
        x = top
        while True:
            c = 2 * x + 1
            if c >= m:
                break
            d = c + 1
            if d < m and (heap_t[d] < heap_t[c] or (heap_t[d] == heap_t[c] and heap_k[d, 0] < heap_k[c, 0])):
                c = d
            if t < heap_t[c] or (t == heap_t[c] and k < heap_k[c, 0]):
                break
            heap_t[x], heap_k[x, 0], heap_k[x, 1] = heap_t[c], heap_k[c, 0], heap_k[c, 1]
            x = c
        heap_t[x], heap_k[x, 0], heap_k[x, 1] = t, k, p


@njit(cache=True, inline="always", _nrt=False)
def _push(st_i, heap_t, heap_k, glob, t, rank, seq, who, slot):
    """A new event: its order key packs (rank, seq), its payload (station, first slot)."""
    key = (rank << _SEQ_BITS) | seq
    payload = (who << _SLOT_BITS) | (slot + 1)
    if glob[G_HEAP] == heap_t.shape[0]:  # full of ends that sharing moved: drop them
        _compact(st_i, heap_t, heap_k, glob)
        if glob[G_HEAP] == heap_t.shape[0]:  # the arrays are not bounds-checked: never write past them
            raise RuntimeError("batched core: event heap full (a reply per slot and an end per station broke)")
    x = glob[G_HEAP]
    glob[G_HEAP] = x + 1
    _sift_up(heap_t, heap_k, x, t, key, payload)


@njit(cache=True, inline="always", _nrt=False)
def _pop(heap_t, heap_k, glob):
    """Removes the first entry; returns its payload. The hole goes down to a leaf along the earlier
    children, then the last entry moves up from there (bottom-up: fewer comparisons)."""
    payload = heap_k[0, 1]
    n = glob[G_HEAP] - 1
    glob[G_HEAP] = n
    t, k, p = heap_t[n], heap_k[n, 0], heap_k[n, 1]
    heap_t[n] = np.inf  # a sentinel: a last child at n is never the earlier one
    x = 0
    while True:
        c = 2 * x + 1
        if c >= n:
            break
        td, tc = heap_t[c + 1], heap_t[c]
        c += (td < tc) | ((td == tc) & (heap_k[c + 1, 0] < heap_k[c, 0]))  # the earlier child, branch-free
        heap_t[x], heap_k[x, 0], heap_k[x, 1] = heap_t[c], heap_k[c, 0], heap_k[c, 1]
        x = c
    _sift_up(heap_t, heap_k, x, t, k, p)
    return payload


@njit(cache=True, inline="always", _nrt=False)
def _sift_up(heap_t, heap_k, x, t, key, payload):
    """Puts the entry (``t``, ``key``, ``payload``) in the hole at ``x``, moving it up past every later parent."""
    while x > 0:
        parent = (x - 1) >> 1
        pt = heap_t[parent]
        if t > pt or (t == pt and key > heap_k[parent, 0]):
            break
        heap_t[x], heap_k[x, 0], heap_k[x, 1] = pt, heap_k[parent, 0], heap_k[parent, 1]
        x = parent
    heap_t[x], heap_k[x, 0], heap_k[x, 1] = t, key, payload


@njit(cache=True, inline="always", _nrt=False)
def _call(calls, glob, glob_f, now, seq, j):
    """Station ``j``'s iteration start at ``(now, ITER, seq)``: the starts due are all of one instant
    (the last rank of it; every start due runs before the time moves on), kept beside the heap."""
    x = glob[G_NCALLS]
    if x == calls.shape[0]:  # one start due per station at most
        raise RuntimeError("batched core: more starts due than stations")
    glob[G_NCALLS] = x + 1
    glob_f[F_CALLS_T] = now
    calls[x, 0] = seq
    calls[x, 1] = j


@njit(cache=True, inline="always", _nrt=False)
def _new_slot(slots, glob):
    s = glob[G_FREE]
    if s < 0:  # the arrays are not bounds-checked: never read past them
        raise RuntimeError("batched core: no free step slot (one per job and one per abort broke)")
    glob[G_FREE] = slots[s, L_NEXT]
    return s


@njit(cache=True, inline="always", _nrt=False)
def _fill_slot(slots, s, job, tokens, blocks, attempt):
    slots[s, L_JOB], slots[s, L_TOKENS], slots[s, L_BLOCKS], slots[s, L_ATTEMPT] = job, tokens, blocks, attempt
    slots[s, L_NEXT] = -1
    slots[s, L_PREV] = -1


@njit(cache=True, inline="always", _nrt=False)
def _free_slot(slots, glob, s):
    slots[s, L_NEXT] = glob[G_FREE]
    glob[G_FREE] = s


@njit(cache=True, inline="always", _nrt=False)
def _append(jobs, st_i, slots, j, s):
    """Step ``s`` joins the tail of station ``j``'s queue."""
    tail = st_i[j, S_QTAIL]
    slots[s, L_PREV] = tail
    slots[s, L_NEXT] = -1
    if tail < 0:
        st_i[j, S_QHEAD] = s
    else:
        slots[tail, L_NEXT] = s
    st_i[j, S_QTAIL] = s
    jobs[slots[s, L_JOB], J_QSLOT] = s


@njit(cache=True, inline="always", _nrt=False)
def _enqueue(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, j, s, now):
    """Step ``s`` waits at station ``j``; an iteration starts after every event of this instant
    (steps that reach it together share it) unless one runs or is due."""
    _append(jobs, st_i, slots, j, s)
    state = st_i[j, S_STATE]
    if state == RUNNING or state == CALLED:
        return
    if (
        state == FREE
        and now == st_f[j, S_START_T]
        and not (glob_f[F_ITER_T] == now and glob[G_ITER_SEQ] > st_i[j, S_START_SEQ])
    ):
        seq = st_i[j, S_START_SEQ]  # the start after its last iteration is still to come in this instant
    else:
        glob[G_SEQ] += 1
        seq = glob[G_SEQ]
    _call(calls, glob, glob_f, now, seq, j)
    st_i[j, S_STATE] = CALLED


@njit(cache=True, inline="always", _nrt=False)
def _send(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, i, s, now):
    """Job ``i``'s current step, in slot ``s``, to its current hop (or to the head after the last one)."""
    h = jobs[i, J_HOP]
    attempt = jobs[i, J_ATTEMPT]
    if h == jobs[i, J_HOPS]:
        _fill_slot(slots, s, i, 1, 1, attempt)
        _enqueue(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, glob[G_HEAD], s, now)
        return
    r = jobs[i, J_ROUTE] + h
    j = routes[r, 0]
    m = routes[r, 1]
    if st_i[j, S_COSTED] == 0:
        _fill_slot(slots, s, i, 0, m, attempt)
        glob[G_SEQ] += 1
        _push(st_i, heap_t, heap_k, glob, now + m * st_f[j, S_LONE] + st_f[j, S_COMM], REPLY, glob[G_SEQ], j, s)
        jobs[i, J_TOKENS] = 0
    else:
        q = jobs[i, J_TOKENS]
        chunk = glob[G_CHUNK]
        _fill_slot(slots, s, i, q if q < chunk else chunk, m, attempt)
        _enqueue(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, j, s, now)


@njit(cache=True, inline="always", _nrt=False)
def _share(st_i, st_f, heap_t, heap_k, glob, host_i, host_f, h, now, j, busy):
    """Processor sharing on host ``h`` (:class:`~chainserve.sim.batched.BatchedService` ``hosts``):
    station ``j``'s iteration joins (``busy`` = 1, its work in ``S_WORK``) or leaves (0) the ones in
    progress there. Each progressed at min(1, cores / n) since the last change; their ends move to
    what is left at the new rate (the old end events go stale: ``S_END_SEQ``)."""
    n = host_i[h, H_BUSY]
    first, last = host_i[h, H_FIRST], host_i[h, H_FIRST] + host_i[h, H_SIZE]
    if n > 0:
        rate = host_f[h, H_CORES] / n
        if rate > 1.0:
            rate = 1.0
        dt = now - host_f[h, H_SINCE]
        for x in range(first, last):
            k = st_i[x, S_MEMBER]
            if st_i[k, S_SHARING] and k != j:
                left = st_f[k, S_WORK] - dt * rate
                st_f[k, S_WORK] = left if left > 0.0 else 0.0
    host_f[h, H_SINCE] = now
    st_i[j, S_SHARING] = busy
    n += 1 if busy else -1
    host_i[h, H_BUSY] = n
    if n == 0:
        return
    rate = host_f[h, H_CORES] / n
    if rate > 1.0:
        rate = 1.0
    for x in range(first, last):
        k = st_i[x, S_MEMBER]
        if st_i[k, S_SHARING]:
            glob[G_SEQ] += 1
            st_i[k, S_END_SEQ] = glob[G_SEQ]
            _push(st_i, heap_t, heap_k, glob, now + st_f[k, S_WORK] / rate, ITEM_END, glob[G_SEQ], k, st_i[k, S_BATCH])


@njit(cache=True, inline="always", _nrt=False)
def _iterate(
    jobs,
    st_i,
    st_f,
    slots,
    heap_t,
    heap_k,
    calls,
    glob,
    glob_f,
    scratch,
    host_i,
    host_f,
    j,
    seq,
    now,
    limit_t,
    limit_rank,
):
    """Station ``j``'s iteration starts: its batch by the block server's rule, its cost. Returns the
    batch's first slot when the iteration is free and its end the next event (it is not pushed: it
    runs at once), else −1."""
    glob_f[F_ITER_T] = now
    glob[G_ITER_SEQ] = seq
    s = st_i[j, S_QHEAD]
    if s < 0:  # its steps were aborted
        st_i[j, S_STATE] = IDLE
        return -1
    count = 0
    while s >= 0:  # the waiting steps' tokens, oldest first
        scratch[0, count] = slots[s, L_TOKENS]
        scratch[1, count] = s
        count += 1
        s = slots[s, L_NEXT]
    if count == 1:  # a lone step goes whatever its tokens
        scratch[2, 0] = k = 1
    else:
        k = take_batch_mask(scratch[0], count, glob[G_BUDGET], glob[G_LEAST], scratch[2])
    first = last = -1
    b = 0
    for x in range(count):
        if not scratch[2, x]:
            continue
        s = scratch[1, x]  # out of the queue, into the batch
        prev, nxt = slots[s, L_PREV], slots[s, L_NEXT]
        if prev < 0:
            st_i[j, S_QHEAD] = nxt
        else:
            slots[prev, L_NEXT] = nxt
        if nxt < 0:
            st_i[j, S_QTAIL] = prev
        else:
            slots[nxt, L_PREV] = prev
        jobs[slots[s, L_JOB], J_QSLOT] = -1
        scratch[3, b] = scratch[0, x]
        scratch[4, b] = slots[s, L_BLOCKS]
        b += 1
        if last < 0:
            first = s
        else:
            slots[last, L_NEXT] = s
        last = s
        if b == k:
            break
    slots[last, L_NEXT] = -1
    seconds = 0.0
    if st_i[j, S_COSTED]:
        seconds = iteration_s(
            scratch[4], scratch[3], k, st_f[j, S_ALPHA], st_f[j, S_BETA], st_f[j, S_PALPHA], st_f[j, S_PBETA]
        )
    end = now + seconds
    st_f[j, S_START_T] = end
    st_i[j, S_STATE] = RUNNING
    if (
        end == now
        and (glob[G_HEAP] == 0 or heap_t[0] > now or (heap_k[0, 0] >> _SEQ_BITS) > ITEM_END)
        and (now < limit_t or limit_rank > ITEM_END)
    ):  # a free iteration whose end comes next: over at once
        glob[G_SEQ] += 1
        st_i[j, S_START_SEQ] = glob[G_SEQ]
        return first
    if glob[G_SHARED] and seconds > 0.0:  # its end depends on what else runs on its host
        st_f[j, S_WORK] = seconds
        st_i[j, S_BATCH] = first
        _share(st_i, st_f, heap_t, heap_k, glob, host_i, host_f, st_i[j, S_HOST], now, j, 1)
    else:
        glob[G_SEQ] += 1
        st_i[j, S_END_SEQ] = glob[G_SEQ]
        _push(st_i, heap_t, heap_k, glob, end, ITEM_END, glob[G_SEQ], j, first)
    glob[G_SEQ] += 1
    st_i[j, S_START_SEQ] = glob[G_SEQ]
    return -1


@njit(cache=True, inline="always", _nrt=False)
def _server_done(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, j, s, now):
    """Server ``j``'s iteration of the batch from slot ``s`` ended: each step moves on (its replies
    travel together), a prompt's next chunk waits for the next iteration."""
    chunk = glob[G_CHUNK]
    first = last = -1
    while s >= 0:
        nxt = slots[s, L_NEXT]
        i = slots[s, L_JOB]
        if slots[s, L_ATTEMPT] != jobs[i, J_ATTEMPT]:
            _free_slot(slots, glob, s)
        else:
            left = jobs[i, J_TOKENS] - slots[s, L_TOKENS]
            jobs[i, J_TOKENS] = left
            if left > 0:
                slots[s, L_TOKENS] = left if left < chunk else chunk
                _append(jobs, st_i, slots, j, s)  # back in the queue (the station runs: no start to call)
            else:
                slots[s, L_NEXT] = -1
                if last < 0:
                    first = s
                else:
                    slots[last, L_NEXT] = s
                last = s
        s = nxt
    if first >= 0:
        glob[G_SEQ] += 1
        _push(st_i, heap_t, heap_k, glob, now + st_f[j, S_COMM], REPLY, glob[G_SEQ], j, first)


@njit(cache=True, inline="always", _nrt=False)
def _station_next(st_i, calls, glob, glob_f, j, now):
    """After station ``j``'s iteration: its next start at its reserved place, if anything waits."""
    if st_i[j, S_QHEAD] >= 0:
        _call(calls, glob, glob_f, now, st_i[j, S_START_SEQ], j)
        st_i[j, S_STATE] = CALLED
    else:
        st_i[j, S_STATE] = FREE


@njit(cache=True, inline="always", _nrt=False)
def _head_done(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, s, now):
    """The head's iteration from slot ``s`` on: each token is sampled, its job's next step begins;
    returns at a job's last token (the rest of the batch is handed out at the next :func:`advance`)."""
    while s >= 0:
        nxt = slots[s, L_NEXT]
        i = slots[s, L_JOB]
        if slots[s, L_ATTEMPT] != jobs[i, J_ATTEMPT]:
            _free_slot(slots, glob, s)
            s = nxt
            continue
        jobs[i, J_STEPS] -= 1
        if jobs[i, J_STEPS] == 0:
            _free_slot(slots, glob, s)
            glob[G_PEND_SLOT] = nxt
            return i
        jobs[i, J_HOP] = 0
        jobs[i, J_TOKENS] = 1
        _send(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, i, s, now)  # the slot goes on
        s = nxt
    glob[G_PEND_ST] = -1
    _station_next(st_i, calls, glob, glob_f, glob[G_HEAD], now)
    return -1


@njit(cache=True, inline="always", _nrt=False)
def _replies(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, s, now):
    """The replies of steps that left one server together reached the orchestrator: each step goes
    on to its next hop."""
    while s >= 0:
        nxt = slots[s, L_NEXT]
        i = slots[s, L_JOB]
        if slots[s, L_ATTEMPT] != jobs[i, J_ATTEMPT]:
            _free_slot(slots, glob, s)
        else:
            jobs[i, J_HOP] += 1
            jobs[i, J_TOKENS] = 1 if jobs[i, J_STEPS] < jobs[i, J_OUTPUT] else jobs[i, J_PROMPT]
            _send(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, i, s, now)  # the slot goes on
        s = nxt


@njit(cache=True, _nrt=False)
def advance(
    jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, scratch, host_i, host_f, limit_t, limit_rank
):
    """Runs the core's events that come before (``limit_t``, ``limit_rank``), the loop's next event;
    returns ``(job, t)`` at a job's last token, or ``(−1, limit_t)`` when none is left before the
    limit. A head batch cut short by a finished job is handed out first, whatever the limit (its
    events are one)."""
    if glob[G_PEND_ST] >= 0:
        done = _head_done(
            jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, glob[G_PEND_SLOT], glob_f[F_NOW]
        )
        if done >= 0:
            return done, glob_f[F_NOW]
    while True:
        calls_due = glob[G_NCALLS] > 0
        if glob[G_HEAP] > 0:
            t = heap_t[0]
            rank = heap_k[0, 0] >> _SEQ_BITS
            if calls_due and glob_f[F_CALLS_T] < t:
                calls_due = True
            else:
                calls_due = False  # the heap's events of the instant rank before its starts
        elif not calls_due:
            return -1, limit_t
        if calls_due:
            t = glob_f[F_CALLS_T]
            if t > limit_t or (t == limit_t and ITER > limit_rank):
                return -1, limit_t
            first = 0
            for x in range(1, glob[G_NCALLS]):
                if calls[x, 0] < calls[first, 0]:
                    first = x
            seq, j = calls[first, 0], calls[first, 1]
            last = glob[G_NCALLS] - 1
            calls[first, 0], calls[first, 1] = calls[last, 0], calls[last, 1]
            glob[G_NCALLS] = last
            glob_f[F_NOW] = t
            s = _iterate(
                jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, scratch, host_i, host_f, j, seq, t,
                limit_t, limit_rank,
            )  # fmt: skip
            if s < 0:
                continue
            rank = ITEM_END
        else:
            if t > limit_t or (t == limit_t and rank > limit_rank):
                return -1, limit_t
            key = heap_k[0, 0]
            payload = _pop(heap_t, heap_k, glob)
            j, s = payload >> _SLOT_BITS, (payload & _SLOT_MASK) - 1
            if rank == ITEM_END and (key & _SEQ_MASK) != st_i[j, S_END_SEQ]:
                continue  # an end its host's sharing moved
            glob_f[F_NOW] = t
            if st_i[j, S_SHARING] and rank == ITEM_END:
                _share(st_i, st_f, heap_t, heap_k, glob, host_i, host_f, st_i[j, S_HOST], t, j, 0)
        if rank == REPLY:
            _replies(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, s, t)
        elif j == glob[G_HEAD]:
            glob[G_PEND_ST] = j
            done = _head_done(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, s, t)
            if done >= 0:
                return done, glob_f[F_NOW]
        else:
            _server_done(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, j, s, t)
            _station_next(st_i, calls, glob, glob_f, j, t)


@njit(cache=True, _nrt=False)
def start(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, i, route, hops, now):
    """Job ``i``'s service begins on the hops at ``routes[route:route + hops]``: its prompt goes to
    the first hop."""
    jobs[i, J_ROUTE] = route
    jobs[i, J_HOPS] = hops
    jobs[i, J_STEPS] = jobs[i, J_OUTPUT]
    jobs[i, J_HOP] = 0
    jobs[i, J_TOKENS] = jobs[i, J_PROMPT]
    _send(jobs, st_i, st_f, slots, heap_t, heap_k, calls, glob, glob_f, routes, i, _new_slot(slots, glob), now)


@njit(cache=True, _nrt=False)
def abort(jobs, st_i, slots, glob, i):
    """Job ``i`` lost its service: its waiting step leaves its queue, its steps in flight are void."""
    jobs[i, J_ATTEMPT] += 1
    s = jobs[i, J_QSLOT]
    if s < 0:
        return
    jobs[i, J_QSLOT] = -1
    prev, nxt = slots[s, L_PREV], slots[s, L_NEXT]
    j = 0
    if prev >= 0:
        slots[prev, L_NEXT] = nxt
    if nxt >= 0:
        slots[nxt, L_PREV] = prev
    if prev < 0 or nxt < 0:
        for j in range(st_i.shape[0]):
            if st_i[j, S_QHEAD] == s or st_i[j, S_QTAIL] == s:
                break
        if prev < 0:
            st_i[j, S_QHEAD] = nxt
        if nxt < 0:
            st_i[j, S_QTAIL] = prev
    _free_slot(slots, glob, s)
