"""Prometheus metrics of the serving runtime (paper §4.2), named after vLLM's so dashboards carry over.

Each :class:`RuntimeMetrics` owns its own ``CollectorRegistry`` (never the process-global one), so
several servers or tests coexist in one process. The orchestrator feeds it; ``GET /metrics`` of
:mod:`.api` serves :meth:`RuntimeMetrics.render`. Every metric, defined once:

===============================================  =========  =================================================
name                                             type       meaning
===============================================  =========  =================================================
``chainserve:num_requests_running``              gauge      requests holding a chain slot (in service)
``chainserve:num_requests_waiting``              gauge      requests in the central queue
``chainserve:kv_cache_usage_perc{server}``       gauge      used / total block-slots of a server, 0..1
``chainserve:chain_busy_slots{chain}``           gauge      jobs in service on plan chain k (numbered from 1)
``chainserve:chain_capacity_slots{chain}``       gauge      c_k, the jobs chain k may serve at once (§2.2)
``chainserve:time_to_first_token_seconds``       histogram  arrival → first token (``Finished.ttft_s``)
``chainserve:time_per_output_token_seconds``     histogram  mean gap between output tokens after the first
``chainserve:e2e_request_latency_seconds``       histogram  arrival → end, the response time T (``e2e_s``)
``chainserve:request_queue_time_seconds``        histogram  arrival → start of service, waiting (``queued_s``)
``chainserve:request_success_total{finished_reason}``  counter  finished requests, ``stop`` or ``length``
``chainserve:request_failure_total{reason}``     counter    e.g. ``cancelled`` (client gone), ``rejected``
                                                            (queue full, HTTP 429), ``error``
``chainserve:prompt_tokens_total``               counter    prompt tokens of finished requests
``chainserve:generation_tokens_total``           counter    tokens generated, counted as each is sampled (as
                                                            vLLM counts per step), so its rate is live while
                                                            requests run; cancelled and failed ones' included
``chainserve:plan_changes_total{reason}``        counter    plan changes: ``server_failed``, ``server_back``,
                                                            ``replaced``; with ``--adapt`` ``rate_up``, ``rate_down``
``chainserve:server_up{server}``                 gauge      1 while a block server answers its heartbeats
``chainserve:requests_resumed_total``            counter    jobs replayed on another chain after a failure
``chainserve:takeovers_total``                   counter    1 once a standby took over (``serve --standby-of``)
``chainserve:orchestrator_epoch``                gauge      the epoch this orchestrator stamps its messages with
``chainserve:server_batch_size{server}``         histogram  sessions per batched iteration of a block server
``chainserve:server_batch_tokens_total{server}`` counter    tokens its iterations computed (a decode is one)
===============================================  =========  =================================================

The two ``server_batch`` metrics are the block servers' own counts (issue 17), as their last heartbeat
reported them (``info``'s ``batch_sizes`` and ``num_batch_tokens``; a restarted server starts again from
zero, which Prometheus reads as a counter reset).

Histograms share :data:`LATENCY_BUCKETS_S`, 1 ms .. 10 min. Counters also expose prometheus-client's
``*_created`` samples. Beside the histograms (cumulative since start), :class:`RecentLatencies` keeps the
exact times of the requests finished in the last :data:`RECENT_WINDOW_S` seconds, whose mean and
percentiles ``/status`` reports (``latency``) for the status page.

>>> m = RuntimeMetrics()
>>> m.set_kv_usage("s0", used_pages=3, total_pages=12)
>>> body, content_type = m.render()
>>> b'chainserve:kv_cache_usage_perc{server="s0"} 0.25' in body
True
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from chainserve.analysis.records import Stats
from chainserve.plan.types import chain_number

from .requests import Finished

#: Histogram buckets (seconds): from a 1 ms token gap to a 10 min queue wait.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Buckets of ``chainserve:server_batch_size`` (sessions per iteration).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: The sliding window of :class:`RecentLatencies` (seconds) and the most requests it keeps.
RECENT_WINDOW_S = 60.0
RECENT_MAX_REQUESTS = 10_000


class RecentLatencies:
    """The times of the requests finished in the last ``window_s`` seconds of ``clock`` (at most
    ``max_requests``, the newest), summarised with :class:`~chainserve.analysis.records.Stats` under the
    keys ``chainserve bench --json`` uses: ``response`` (e2e), ``waiting`` (queue), ``ttft``, ``tpot``.

    >>> now = [0.0]
    >>> recent = RecentLatencies(window_s=10.0, clock=lambda: now[0])
    >>> for e2e in (1.0, 2.0, 3.0):
    ...     recent.add(ttft_s=0.5, tpot_s=None, e2e_s=e2e, queued_s=0.0)
    >>> recent.summary()["response"]["p50"], recent.summary()["tpot"]
    (2.0, None)
    >>> now[0] = 11.0
    >>> recent.summary()["requests"]
    0
    """

    def __init__(
        self,
        window_s: float = RECENT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_requests: int = RECENT_MAX_REQUESTS,
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self._rows: deque[tuple[float, float, float, float, float]] = deque(maxlen=max_requests)

    def add(self, ttft_s: float, tpot_s: float | None, e2e_s: float, queued_s: float) -> None:
        """One finished request, now (``tpot_s`` ``None``: fewer than two tokens)."""
        self._rows.append((self.clock(), e2e_s, queued_s, ttft_s, np.nan if tpot_s is None else tpot_s))

    def summary(self) -> dict[str, Any]:
        """``window_s``, ``requests`` (finished in the window) and ``response`` / ``waiting`` / ``ttft`` /
        ``tpot`` each ``{mean, p50, p95, p99}`` in seconds, ``None`` without a request to measure."""
        cutoff = self.clock() - self.window_s
        while self._rows and self._rows[0][0] < cutoff:
            self._rows.popleft()
        out: dict[str, Any] = {"window_s": self.window_s, "requests": len(self._rows)}
        table = np.array(self._rows, dtype=float).reshape(-1, 5)
        for col, key in enumerate(("response", "waiting", "ttft", "tpot"), start=1):
            values = table[:, col][~np.isnan(table[:, col])]
            out[key] = Stats.of(values).to_json() if values.size else None
        return out


class ServerBatches:
    """A collector of the block servers' batch counts, from the ``info`` of their heartbeats.

    >>> b = ServerBatches()
    >>> b.update("s0", {"batch_sizes": [[1, 3], [8, 2]], "num_batch_tokens": 19})
    >>> hist, tokens = b.collect()
    >>> [(s.labels["le"], s.value) for s in hist.samples if s.labels.get("le") in ("1", "4", "8", "+Inf")]
    [('1', 3), ('4', 3), ('8', 5), ('+Inf', 5)]
    """

    def __init__(self) -> None:
        self.latest: dict[str, tuple[list[tuple[int, int]], int]] = {}

    def update(self, server: str, info: dict[str, Any]) -> None:
        sizes = [(int(n), int(count)) for n, count in info.get("batch_sizes", [])]
        self.latest[server] = (sizes, int(info.get("num_batch_tokens", 0)))

    def collect(self):
        hist = HistogramMetricFamily(
            "chainserve:server_batch_size", "Sessions per batched iteration of a block server.", labels=["server"]
        )
        tokens = CounterMetricFamily(
            "chainserve:server_batch_tokens", "Tokens a block server's iterations computed.", labels=["server"]
        )
        for server, (sizes, num_tokens) in sorted(self.latest.items()):
            buckets = [(str(edge), sum(c for n, c in sizes if n <= edge)) for edge in BATCH_SIZE_BUCKETS]
            buckets.append(("+Inf", sum(c for _, c in sizes)))
            hist.add_metric([server], buckets, sum_value=sum(n * c for n, c in sizes))
            tokens.add_metric([server], num_tokens)
        return [hist, tokens]


class RuntimeMetrics:
    """The runtime's metrics in one registry (``registry``: a fresh one unless given); ``recent`` holds
    the last minute's request times (``clock``: its time source)."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.recent = RecentLatencies(clock=clock)
        r = self.registry
        self.num_requests_running = Gauge(
            "chainserve:num_requests_running", "Requests in service on a chain.", registry=r
        )
        self.num_requests_waiting = Gauge(
            "chainserve:num_requests_waiting", "Requests waiting in the central queue.", registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "chainserve:kv_cache_usage_perc",
            "Fraction of a server's KV block-slots in use (0..1).",
            ["server"],
            registry=r,
        )
        self.chain_busy_slots = Gauge(
            "chainserve:chain_busy_slots", "Jobs in service on a plan chain.", ["chain"], registry=r
        )
        self.chain_capacity_slots = Gauge(
            "chainserve:chain_capacity_slots", "Capacity c_k of a plan chain (jobs at once).", ["chain"], registry=r
        )
        self.time_to_first_token = self._histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.time_per_output_token = self._histogram(
            "time_per_output_token_seconds", "Mean time between output tokens after the first."
        )
        self.e2e_request_latency = self._histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.request_queue_time = self._histogram("request_queue_time_seconds", "Arrival to start of service.")
        self.request_success = Counter(
            "chainserve:request_success_total", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.request_failure = Counter(
            "chainserve:request_failure_total", "Requests that did not finish, by reason.", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("chainserve:prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("chainserve:generation_tokens_total", "Tokens generated.", registry=r)
        self.plan_changes = Counter("chainserve:plan_changes_total", "Plan changes by reason.", ["reason"], registry=r)
        self.server_up = Gauge("chainserve:server_up", "1 while a block server answers.", ["server"], registry=r)
        self.requests_resumed = Counter(
            "chainserve:requests_resumed_total", "Jobs resumed on another chain after a failure.", registry=r
        )
        self.takeovers = Counter("chainserve:takeovers_total", "Takeovers by this standby orchestrator.", registry=r)
        self.epoch = Gauge("chainserve:orchestrator_epoch", "Epoch of this orchestrator's messages.", registry=r)
        self.server_batches = ServerBatches()
        r.register(self.server_batches)

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(f"chainserve:{name}", doc, buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def set_queue(self, num_running: int, num_waiting: int) -> None:
        """Requests in service and in the central queue, now."""
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)

    def set_kv_usage(self, server: str, used_pages: int, total_pages: int) -> None:
        """KV usage of ``server`` as a fraction of its pages under its limit (0 for a server with none)."""
        if not 0 <= used_pages <= max(total_pages, 0):
            raise ValueError(f"used_pages: must lie in [0, {total_pages}], got {used_pages}")
        usage = used_pages / total_pages if total_pages > 0 else 0.0
        self.kv_cache_usage_perc.labels(server=server).set(usage)

    def set_chain(self, index: int, busy: int, capacity: int) -> None:
        """Occupancy ``busy`` and capacity c_k of the plan chain at ``index``, labelled with its number (from 1)."""
        label = str(chain_number(index))
        self.chain_busy_slots.labels(chain=label).set(busy)
        self.chain_capacity_slots.labels(chain=label).set(capacity)

    def observe_finished(self, f: Finished, tpot_s: float | None) -> None:
        """A finished request: its times, tokens and finish reason; ``tpot_s`` is ``None`` when fewer
        than two tokens were generated (no gap to measure)."""
        self.time_to_first_token.observe(f.ttft_s)
        self.e2e_request_latency.observe(f.e2e_s)
        self.request_queue_time.observe(f.queued_s)
        if tpot_s is not None:
            self.time_per_output_token.observe(tpot_s)
        self.recent.add(f.ttft_s, tpot_s, f.e2e_s, f.queued_s)
        self.request_success.labels(finished_reason=f.finish_reason).inc()
        self.prompt_tokens.inc(f.prompt_tokens)  # generated tokens are counted as they come (observe_generated)

    def observe_generated(self, num_tokens: int = 1) -> None:
        """Tokens a request just generated (each once: a resumed job does not generate its tokens again)."""
        self.generation_tokens.inc(num_tokens)

    def observe_failure(self, reason: str) -> None:
        """A request that ended without :class:`Finished` (``cancelled``, ``rejected``, ``error``, …)."""
        self.request_failure.labels(reason=reason).inc()

    def observe_plan_change(self, reason: str) -> None:
        """The plan in force changed (``reason``: ``server_failed``, ``server_back``, ``replaced``,
        or the adaptive controller's ``rate_up`` / ``rate_down``)."""
        self.plan_changes.labels(reason=reason).inc()

    def set_server_up(self, server: str, up: bool) -> None:
        self.server_up.labels(server=server).set(1 if up else 0)

    def observe_takeover(self) -> None:
        """This standby took the block servers over from a silent active orchestrator."""
        self.takeovers.inc()

    def set_server_batches(self, server: str, info: dict[str, Any]) -> None:
        """A block server's batch counts, from its latest ``info``."""
        self.server_batches.update(server, info)

    def observe_resume(self) -> None:
        """A job restarts on another chain, replaying its prompt and the tokens generated so far."""
        self.requests_resumed.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text of this registry and its HTTP content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
