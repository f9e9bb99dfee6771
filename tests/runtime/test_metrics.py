"""RuntimeMetrics (paper §4.2's measurements, vLLM's names): own registry, every metric, the values."""

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from chainserve.runtime.metrics import LATENCY_BUCKETS_S, RuntimeMetrics
from chainserve.runtime.requests import Finished

NAMES = (
    "chainserve:num_requests_running",
    "chainserve:num_requests_waiting",
    "chainserve:kv_cache_usage_perc",
    "chainserve:chain_busy_slots",
    "chainserve:chain_capacity_slots",
    "chainserve:time_to_first_token_seconds",
    "chainserve:time_per_output_token_seconds",
    "chainserve:e2e_request_latency_seconds",
    "chainserve:request_queue_time_seconds",
    "chainserve:request_success_total",
    "chainserve:request_failure_total",
    "chainserve:prompt_tokens_total",
    "chainserve:generation_tokens_total",
)


def samples(m: RuntimeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = m.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def finished(**kw) -> Finished:
    base = dict(
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=5,
        text="hello",
        chain=0,
        queued_s=0.5,
        ttft_s=1.5,
        e2e_s=3.0,
    )
    return Finished(**(base | kw))


def test_every_metric_is_exposed_after_one_of_each_call():
    m = RuntimeMetrics()
    m.set_queue(num_running=2, num_waiting=3)
    m.set_kv_usage("s0", 3, 4)
    m.set_chain(0, busy=1, capacity=4)
    m.observe_generated(5)
    m.observe_finished(finished(), tpot_s=0.2)
    m.observe_failure("cancelled")
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    for name in NAMES:
        assert name.encode() in body, name


def test_values():
    m = RuntimeMetrics()
    m.set_queue(num_running=2, num_waiting=3)
    m.set_kv_usage("s0", 3, 4)
    m.set_kv_usage("s1", 0, 0)
    m.set_chain(1, busy=1, capacity=4)  # the plan's second chain: chain 2, as `chainserve plan` numbers it
    m.observe_generated(5)
    m.observe_finished(finished(), tpot_s=0.2)
    m.observe_generated()
    m.observe_finished(finished(finish_reason="length", completion_tokens=1), tpot_s=None)
    m.observe_failure("rejected")
    m.observe_failure("rejected")
    s = samples(m)
    assert s[("chainserve:num_requests_running", ())] == 2
    assert s[("chainserve:num_requests_waiting", ())] == 3
    assert s[("chainserve:kv_cache_usage_perc", (("server", "s0"),))] == 0.75
    assert s[("chainserve:kv_cache_usage_perc", (("server", "s1"),))] == 0.0
    assert s[("chainserve:chain_busy_slots", (("chain", "2"),))] == 1
    assert s[("chainserve:chain_capacity_slots", (("chain", "2"),))] == 4
    assert s[("chainserve:request_success_total", (("finished_reason", "stop"),))] == 1
    assert s[("chainserve:request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("chainserve:request_failure_total", (("reason", "rejected"),))] == 2
    assert s[("chainserve:prompt_tokens_total", ())] == 14
    assert s[("chainserve:generation_tokens_total", ())] == 6
    assert s[("chainserve:time_to_first_token_seconds_count", ())] == 2
    assert s[("chainserve:time_to_first_token_seconds_sum", ())] == 3.0
    assert s[("chainserve:e2e_request_latency_seconds_sum", ())] == 6.0
    assert s[("chainserve:request_queue_time_seconds_sum", ())] == 1.0
    assert s[("chainserve:time_per_output_token_seconds_count", ())] == 1  # None is not observed


def test_buckets_span_a_millisecond_to_ten_minutes():
    assert LATENCY_BUCKETS_S[0] == 0.001 and LATENCY_BUCKETS_S[-1] == 600.0
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))
    s = samples(RuntimeMetrics())
    assert ("chainserve:e2e_request_latency_seconds_bucket", (("le", "600.0"),)) in s


def test_registries_are_independent_and_not_global():
    a, b = RuntimeMetrics(), RuntimeMetrics()  # a second one must not clash ("Duplicated timeseries")
    a.set_queue(5, 0)
    assert samples(a)[("chainserve:num_requests_running", ())] == 5
    assert samples(b)[("chainserve:num_requests_running", ())] == 0
    assert REGISTRY.get_sample_value("chainserve:num_requests_running") is None


def test_a_given_registry_is_used():
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    m = RuntimeMetrics(reg)
    m.set_queue(1, 1)
    assert reg.get_sample_value("chainserve:num_requests_waiting") == 1


@pytest.mark.parametrize(("used", "total"), [(-1, 4), (5, 4), (1, 0)])
def test_kv_usage_rejects_impossible_counts(used, total):
    with pytest.raises(ValueError, match="used_pages"):
        RuntimeMetrics().set_kv_usage("s0", used, total)
