"""The runtime verbs of every dispatcher (dispatch/base.py): attempts and late completions, cancel,
abort, restore_server and drain, hand-checked on small JFFC and per-chain cases (the path routers'
are in test_baselines.py; random sequences of all verbs in test_dispatch.py)."""

from __future__ import annotations

import pytest

from chainserve.dispatch.base import Job
from chainserve.dispatch.jffc import JFFC
from chainserve.dispatch.per_chain import RandomDispatch, SpeedAwareJSQ
from chainserve.plan.types import Chain, Hop


def chain(time_s, capacity, *servers):
    return Chain(tuple(Hop(s, i + 1, 1) for i, s in enumerate(servers)), time_s, capacity)


def started(starts):
    """(job, chain, attempt) of each start."""
    return [(s.job.job_id, s.route.chain, s.attempt) for s in starts]


def submit_all(d, num_jobs):
    return [s for i in range(num_jobs) for s in d.submit(Job(i, float(i)), float(i))]


def test_jffc_attempts_count_restarts_and_late_completions_are_ignored():
    d = JFFC([chain(1.0, 1, 0), chain(2.0, 1, 1)])
    assert started(submit_all(d, 1)) == [(0, 0, 0)]
    assert started(d.abort(0, 1.0)) == [(0, 0, 1)]  # back at the head, the fastest slot is free again
    assert d.complete(0, 2.0, attempt=0) == [] and d.num_in_service == 1  # the aborted start's message
    assert d.complete(0, 3.0, attempt=1) == [] and d.num_in_service == 0  # the current one: done
    assert d.complete(0, 4.0, attempt=1) == []  # finished: a duplicate is ignored …
    with pytest.raises(KeyError):
        d.complete(0, 4.0)  # … but without an attempt it is a driver bug
    with pytest.raises(KeyError):
        d.abort(0, 4.0)


def test_jffc_abort_puts_the_job_before_older_waiters():
    d = JFFC([chain(1.0, 1, 0), chain(2.0, 1, 1)])
    assert started(submit_all(d, 4)) == [(0, 0, 0), (1, 1, 0)]
    assert started(d.abort(1, 5.0)) == [(1, 1, 1)]  # head of [1, 2, 3] takes the freed slow slot
    assert [j.job_id for j in d.queue] == [2, 3]


def test_jffc_cancel_waiting_in_service_and_unknown():
    d = JFFC([chain(1.0, 1, 0)])
    submit_all(d, 3)
    assert d.cancel(1, 5.0) == [] and [j.job_id for j in d.queue] == [2]
    assert started(d.cancel(0, 6.0)) == [(2, 0, 0)]  # the freed slot goes to the head
    assert d.cancel(0, 7.0) == [] and d.cancel(99, 7.0) == []  # idempotent
    assert d.num_waiting == 0 and d.num_in_service == 1
    assert d.complete(0, 8.0, attempt=0) == []  # a cancelled start's late completion


def test_jffc_restore_gives_the_slots_back():
    d = JFFC([chain(1.0, 2, 0), chain(5.0, 1, 1)])
    assert started(submit_all(d, 2)) == [(0, 0, 0), (1, 0, 0)]
    out = d.fail_server(0, 2.0)
    assert [j.job_id for j in out.aborted] == [0, 1] and started(out.starts) == [(0, 1, 1)]
    assert d.restore_server(1, 3.0) == []  # alive: nothing to do
    assert started(d.restore_server(0, 3.0)) == [(1, 0, 1)]
    assert d.restore_server(0, 4.0) == []
    assert started(d.submit(Job(5, 5.0), 5.0)) == [(5, 0, 0)]  # both of chain 0's slots are usable
    assert d.submit(Job(6, 6.0), 6.0) == [] and d.state.busy == [2, 1]


def test_threshold_jffc_gets_its_thresholds_back_once_restored():
    d = JFFC([chain(1.0, 1, 0), chain(10.0, 1, 1), chain(20.0, 1, 2)], thresholds=[0, 3, 5])
    d.fail_server(0, 1.0)
    assert d.threshold_by_rank == (0, 0, 5)
    d.fail_server(1, 2.0)
    assert d.threshold_by_rank == (0, 0, 0)
    d.restore_server(0, 3.0)
    assert d.threshold_by_rank == (0, 3, 5)  # chain 1's server 1 is still down: its rank keeps 3
    d.restore_server(1, 4.0)
    assert d.threshold_by_rank == (0, 3, 5)


def test_jffc_drain_returns_the_queue_and_keeps_jobs_in_service():
    d = JFFC([chain(1.0, 1, 0)])
    submit_all(d, 4)
    d.abort(0, 5.0)  # job 0 restarts at once, so the queue stays [1, 2, 3]
    assert [j.job_id for j in d.drain()] == [1, 2, 3]
    assert d.num_waiting == 0 and d.num_in_service == 1 and d.drain() == []
    other = JFFC([chain(1.0, 1, 0)])
    assert started(other.submit(Job(1, 1.0), 6.0)) == [(1, 0, 0)]  # a new dispatcher counts afresh


def test_per_chain_abort_reassigns_and_the_freed_slot_serves_its_queue():
    # chain 0 (fast, c = 1) on server 0, chain 1 (c = 1) on server 1; SA-JSQ: least n/c, ties fastest
    d = SpeedAwareJSQ([chain(1.0, 1, 0), chain(2.0, 1, 1)])
    assert started(submit_all(d, 4)) == [(0, 0, 0), (1, 1, 0)]
    assert [[j.job_id for j in q] for q in d.queues] == [[2], [3]]
    # job 0 aborts: n = (1, 2) → chain 0 again, before job 2 in arrival order, and takes the free slot
    assert started(d.abort(0, 5.0)) == [(0, 0, 1)]
    assert [[j.job_id for j in q] for q in d.queues] == [[2], [3]]
    with pytest.raises(KeyError):
        d.abort(2, 5.0)


class ScriptedRng:
    """Stands in for a Generator: ``integers(n)`` returns the scripted picks in turn."""

    def __init__(self, *picks):
        self.picks = list(picks)

    def integers(self, n):
        return self.picks.pop(0)


def test_per_chain_abort_to_another_chain_passes_the_slot_on():
    d = RandomDispatch([chain(1.0, 1, 0), chain(2.0, 1, 1)], ScriptedRng(0, 0, 1, 1, 1))
    assert started(submit_all(d, 4)) == [(0, 0, 0), (2, 1, 0)]
    assert [[j.job_id for j in q] for q in d.queues] == [[1], [3]]
    # job 0 aborts and is sent to chain 1 (full: it queues there before job 3); job 1 takes its slot
    assert started(d.abort(0, 5.0)) == [(1, 0, 0)]
    assert [[j.job_id for j in q] for q in d.queues] == [[], [0, 3]]
    assert started(d.complete(2, 6.0)) == [(0, 1, 1)]


def test_per_chain_restore_assigns_the_unassigned_and_cancel_and_drain():
    d = SpeedAwareJSQ([chain(1.0, 1, 0), chain(2.0, 1, 1)])
    submit_all(d, 3)
    d.fail_server(0, 3.0)
    d.fail_server(1, 3.0)
    assert [j.job_id for j in d.unassigned] == [0, 1, 2] and d.num_in_service == 0
    assert d.cancel(1, 4.0) == [] and [j.job_id for j in d.unassigned] == [0, 2]
    assert started(d.restore_server(1, 5.0)) == [(0, 1, 1)]  # job 2 queues at the only live chain
    assert [[j.job_id for j in q] for q in d.queues] == [[], [2]] and not d.unassigned
    assert started(d.restore_server(0, 6.0)) == []  # queued jobs stay where they are
    assert started(d.submit(Job(7, 7.0), 7.0)) == [(7, 0, 0)]
    d.submit(Job(8, 8.0), 8.0)
    assert [j.job_id for j in d.drain()] == [2, 8] and d.num_waiting == 0  # arrival order
    assert started(d.cancel(0, 9.0)) == [] and d.num_in_service == 1
