"""The live status page at ``/`` (issue 7, part 5) in a real headless browser: Debian's Chromium driven by
playwright. ``chainserve serve`` runs the emulated backend with an API key; requests run while the page
loads; then the block servers are frozen (SIGSTOP, with a heartbeat deadline longer than the freeze), so
the page's next refreshes and a ``/metrics`` scrape of ours see the same state, and every number the page
shows (queue, running, busy / capacity per chain, KV usage per server, the plan's shape) must equal
``/metrics`` and ``/plan``. After the load, its latency table must equal ``/status`` and agree with the
histograms of ``/metrics``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from tests.runtime.conftest import EMULATED_6, Served, children_of, serving

from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.requests import Finished

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
)
DASHBOARD = Path(__file__).parents[2] / "examples" / "grafana-chainserve.json"
#: Labels Prometheus adds to every scraped series (the dashboard filters on ``instance``).
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
API_KEY = "page-test-key"
NUM_REQUESTS = 24  # > Σ c_k = 8 of emulated-6: a queue forms
MAX_TOKENS = 64  # a job takes ~2 s: the queue lasts while the page loads
REFRESH_MS = 300


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    # block-slots of 32 tokens: a request takes one, so the load fills the chains and some requests wait
    args = ("--backend", "emulated", "--api-key", API_KEY, "--heartbeat-deadline-s", "60", "--max-tokens", "32")
    with serving(str(EMULATED_6), *args, tmp_path=tmp_path_factory.mktemp("status-page")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settle(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics once two scrapes 0.3 s apart agree: replies already on the wire when the block servers
    stopped have been handled, and nothing moves any more."""
    last = scrape(url)
    for _ in range(30):
        time.sleep(0.3)
        now = scrape(url)
        if now == last:
            return now
        last = now
    raise AssertionError("/metrics kept changing with every block server stopped")


def value(page: Page, selector: str) -> float:
    """The raw number behind what the page shows at ``selector`` (NaN before the first render)."""
    raw = page.get_attribute(selector, "data-value")
    return float("nan") if raw is None else float(raw)


def refreshes(page: Page) -> int:
    return int(page.get_attribute("body", "data-refreshes"))


def wait_until(page: Page, predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll from Python: the page's Content-Security-Policy forbids the eval ``wait_for_function`` needs."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(50)


def wait_refreshes(page: Page, count: int) -> None:
    wait_until(page, lambda: refreshes(page) >= count, f"{count} refreshes")


def send_load(url: str, statuses: list[int]) -> list[threading.Thread]:
    def one() -> None:
        r = httpx.post(
            url + "/v1/completions",
            json={"prompt": "the chain serves", "max_tokens": MAX_TOKENS, "ignore_eos": True},
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=120,
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(NUM_REQUESTS)]
    for t in threads:
        t.start()
    return threads


@needs_chromium
def test_the_page_shows_what_metrics_and_plan_say_while_requests_run(served: Served, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    origins: set[str] = set()
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: origins.add(urlsplit(r.url).netloc))
    statuses: list[int] = []
    threads = send_load(served.url, statuses)
    servers = children_of(served.proc.pid)
    assert servers, "no block-server processes found"
    frozen = False
    try:
        page.goto(f"{served.url}/?refresh={REFRESH_MS}")  # no key: the page reads only the open routes
        wait_until(
            page,
            lambda: refreshes(page) > 0 and value(page, "#num-running") > 0 and value(page, "#num-waiting") > 0,
            "the page to show running and waiting requests",
        )
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        frozen = True
        settled = settle(served.url)
        wait_refreshes(page, refreshes(page) + 2)
        metrics, plan = scrape(served.url), served.get("/plan")
        assert metrics == settled, "the state moved while the block servers were stopped"

        running, waiting = (
            metrics[("chainserve:num_requests_running", ())],
            metrics[("chainserve:num_requests_waiting", ())],
        )
        assert running > 0 and waiting > 0, "the load was not running when the system froze"
        assert value(page, "#num-running") == running and page.inner_text("#num-running") == f"{running:g}"
        assert value(page, "#num-waiting") == waiting and page.inner_text("#num-waiting") == f"{waiting:g}"
        assert len(plan["chains"]) == page.locator("tr.chain").count() == page.locator("path.chain").count() > 0
        for k, chain in enumerate(plan["chains"], start=1):  # numbered from 1, as /status and /metrics do
            busy = metrics[("chainserve:chain_busy_slots", (("chain", str(k)),))]
            capacity = metrics[("chainserve:chain_capacity_slots", (("chain", str(k)),))]
            assert value(page, f"tr.chain[data-chain='{k}'] .busy") == busy, k
            assert page.inner_text(f"tr.chain[data-chain='{k}'] td") == str(k)
            assert value(page, f"tr.chain[data-chain='{k}'] .capacity") == capacity == chain["capacity"], k
            assert page.get_attribute(f"path.chain[data-chain='{k}']", "data-servers") == ",".join(chain["servers"])
        placed = [s for s in plan["servers"] if s["start_block"]]
        assert page.locator("tr.server").count() == page.locator("rect.span").count() == len(placed)
        for s in placed:
            kv = metrics[("chainserve:kv_cache_usage_perc", (("server", s["name"]),))]
            assert value(page, f"tr.server[data-server='{s['name']}'] .kv") == pytest.approx(kv, abs=1e-12)
            assert page.inner_text(f"tr.server[data-server='{s['name']}'] .kv") == f"{100 * kv:.1f} %"
            span = page.locator(f"rect.span[data-server='{s['name']}']")
            assert (int(span.get_attribute("data-start")), int(span.get_attribute("data-blocks"))) == (
                s["start_block"],
                s["num_blocks"],
            )
    finally:
        if frozen:
            for pid in servers:
                os.kill(pid, signal.SIGCONT)
        for t in threads:
            t.join(120)
    assert statuses == [200] * NUM_REQUESTS

    wait_refreshes(page, refreshes(page) + 2)  # idle now: the page's last refresh saw the final state
    metrics, latency = scrape(served.url), served.get("/status")["latency"]
    assert value(page, "#num-finished") == sum(
        v for (name, _), v in metrics.items() if name == "chainserve:request_success_total"
    )
    assert latency["requests"] == NUM_REQUESTS == metrics[("chainserve:e2e_request_latency_seconds_count", ())]
    for key, histogram in (
        ("response", "e2e_request_latency"),
        ("waiting", "request_queue_time"),
        ("ttft", "time_to_first_token"),
        ("tpot", "time_per_output_token"),
    ):
        total, count = (metrics[(f"chainserve:{histogram}_seconds_{part}", ())] for part in ("sum", "count"))
        assert latency[key]["mean"] == pytest.approx(total / count, rel=1e-9), key
        for q in ("mean", "p50", "p95", "p99"):
            assert value(page, f"tr.latency[data-metric='{key}'] td.{q}") == pytest.approx(latency[key][q]), (key, q)
    assert origins == {urlsplit(served.url).netloc}, origins  # nothing fetched from elsewhere
    assert not problems, problems
    page.close()


def test_the_page_is_one_self_contained_file_and_v1_still_needs_the_key(served: Served) -> None:
    r = httpx.get(served.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    assert httpx.get(served.url + "/v1/models", timeout=10).status_code == 401


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    labels: set[str] = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    grouping = r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)"
    for body in re.findall(grouping, expr):
        labels |= set(re.findall(r"[a-zA-Z_]\w*", body))
    expr = re.sub(grouping, "", re.sub(r"\{[^}]*\}", "", expr))
    names = {
        m.group()
        for m in re.finditer(r"[a-zA-Z_:][\w:]*", expr)
        if not expr[m.end() :].lstrip().startswith("(") and m.group() not in PROMQL_WORDS
    }
    return names, labels


def exposed(text: str) -> dict[str, set[str]]:
    """Every series name a /metrics body defines (counters' ``_total``, histograms' ``_bucket`` …), with
    the label names seen on it."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            out[family.name + suffix] = set()
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_the_grafana_dashboard_queries_only_metrics_chainserve_exposes(served: Served) -> None:
    """Names against the live server's /metrics; labels against every metric exercised once (a failure
    reason or a plan change need not have happened on the live server)."""
    live = exposed(httpx.get(served.url + "/metrics", timeout=10).text)
    m = RuntimeMetrics()
    m.set_queue(1, 1)
    m.set_kv_usage("s0", 1, 2)
    m.set_chain(0, 1, 2)
    m.observe_finished(Finished("stop", 3, 2, "hi", chain=0, queued_s=0.1, ttft_s=0.2, e2e_s=0.3), tpot_s=0.1)
    m.observe_failure("cancelled")
    m.observe_plan_change("server_failed")
    m.set_server_up("s0", True)
    m.observe_resume()
    m.set_server_batches("s0", {"batch_sizes": [[1, 2]], "num_batch_tokens": 2})
    labelled = exposed(m.render()[0].decode())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [
        re.sub(r"label_values\((.*),\s*(\w+)\)", r"\1", v["definition"])
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]
    assert len(exprs) > 20
    used: set[str] = set()
    for expr in exprs:
        names, labels = promql_names(expr)
        assert names and names <= live.keys(), (expr, names - live.keys())
        allowed = TARGET_LABELS | set().union(*(labelled[n] for n in names))
        assert labels <= allowed, (expr, labels - allowed)
        used |= names
    families = {name for name in live if not name.endswith("_created")}
    assert {n.removesuffix("_bucket") for n in used} >= {
        n.removesuffix("_bucket") for n in families if n.endswith("_bucket")
    }, "a latency histogram has no panel"
