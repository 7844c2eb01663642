"""`ServedCounts` against prometheus_client: the same observations, the same page.

The reference is the three families as proxy.metrics had them before they became
plain numbers: a Counter and a Histogram, their children created where they were.
Only the `_created` values differ (each side reads the clock itself): they are
replaced by a placeholder, after checking that each lies within the run.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.metrics import CACHE_RESULTS, LOOKUP_RESULTS, REQUEST_BUCKETS, ServedCounts

CALLERS = ("alpha", "beta", "gamma", "unknown")
STATUSES = (200, 304, 400, 401, 404, 429, 500, 502, 503)
# Durations where a bucket walk and a bisection could disagree: bounds exactly, zero
# of both signs, the extremes, and whatever else hypothesis finds. Never NaN: a
# duration is a difference of perf_counter readings.
EDGES = (0.0, -0.0, 5e-324, 1e-12, 1e300, math.inf, -math.inf, -1.0, *REQUEST_BUCKETS)
DURATIONS = st.one_of(
    st.sampled_from(EDGES),
    st.sampled_from(REQUEST_BUCKETS).map(lambda b: math.nextafter(b, math.inf)),
    st.sampled_from(REQUEST_BUCKETS).map(lambda b: math.nextafter(b, -math.inf)),
    st.floats(allow_nan=False),
)


@dataclass(frozen=True)
class Request:
    caller: str
    status: int
    cache: str
    seconds: float


@dataclass(frozen=True)
class Lookup:
    result: str


@dataclass(frozen=True)
class InitCallers:
    names: list[str]


EVENTS = st.lists(
    st.one_of(
        st.builds(
            Request,
            st.sampled_from(CALLERS),
            st.sampled_from(STATUSES),
            st.sampled_from(CACHE_RESULTS),
            DURATIONS,
        ),
        st.builds(Lookup, st.sampled_from(LOOKUP_RESULTS)),
        st.builds(InitCallers, st.lists(st.sampled_from(CALLERS), max_size=3)),
    ),
    max_size=60,
)


class Reference:
    """The families as prometheus_client objects, as proxy.metrics had them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "invoice_proxy_requests_total",
            "API requests answered, by caller and HTTP status.",
            ["caller", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "invoice_proxy_request_duration_seconds",
            "Time to answer an API request, by how the cache served it.",
            ["cache"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "invoice_proxy_cache_lookups_total",
            "Invoice cache lookups by result.",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss", "stale", "coalesced"):
            self.cache_lookups.labels(result=result)
        for cache in CACHE_RESULTS:
            self.request_duration.labels(cache=cache)

    def apply(self, event: Request | Lookup | InitCallers) -> None:
        match event:
            case Request(caller, status, cache, seconds):
                self.requests.labels(caller=caller, code=str(status)).inc()
                self.request_duration.labels(cache=cache).observe(seconds)
            case Lookup(result):
                self.cache_lookups.labels(result=result).inc()
            case InitCallers(names):
                for name in names:
                    self.requests.labels(caller=name, code="200")


def apply(served: ServedCounts, event: Request | Lookup | InitCallers) -> None:
    match event:
        case Request(caller, status, cache, seconds):
            served.request_done(caller, status, cache, seconds)
        case Lookup(result):
            served.lookups[result].value += 1
        case InitCallers(names):
            served.init_callers(names)


CREATED = re.compile(rb"^(\w+_created(?:\{[^}]*\})?) (\S+)$", re.MULTILINE)


def without_created(page: bytes, since: float, until: float) -> bytes:
    """The page with each `_created` value checked to lie in [since, until] and replaced."""
    for match in CREATED.finditer(page):
        assert since <= float(match.group(2)) <= until, match.group(0)
    return CREATED.sub(rb"\1 CREATED", page)


def registry_of(served: ServedCounts) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(served)
    return registry


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_served_counts_expose_what_prometheus_client_would(
    events: list[Request | Lookup | InitCallers],
) -> None:
    """Text format and OpenMetrics, byte for byte but the creation times."""
    since = time.time()
    served, reference = ServedCounts(), Reference()
    ours = registry_of(served)
    for event in events:
        apply(served, event)
        reference.apply(event)
    until = time.time()
    for render in (generate_latest, generate_openmetrics):
        assert without_created(render(ours), since, until) == without_created(
            render(reference.registry), since, until
        )


def test_every_fixed_series_exists_before_anything_is_counted() -> None:
    served = ServedCounts()
    served.init_callers(["alpha", "beta"])
    page = generate_latest(registry_of(served)).decode()
    assert 'invoice_proxy_requests_total{caller="alpha",code="200"} 0.0' in page
    assert 'invoice_proxy_requests_total{caller="beta",code="200"} 0.0' in page
    for cache in CACHE_RESULTS:
        assert f'invoice_proxy_request_duration_seconds_count{{cache="{cache}"}} 0.0' in page
    for result in LOOKUP_RESULTS:
        assert f'invoice_proxy_cache_lookups_total{{result="{result}"}} 0.0' in page


def test_created_series_follow_prometheus_disable_created_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The variable prometheus_client reads drops `_created`, and nothing else."""
    pages = []
    for disabled in ("false", "true"):
        monkeypatch.setenv("PROMETHEUS_DISABLE_CREATED_SERIES", disabled)
        served = ServedCounts()
        served.request_done("alpha", 200, "hit", 0.001)
        served.lookups["hit"].value += 1
        pages.append(generate_openmetrics(registry_of(served)).decode().splitlines())
    with_created, without = pages
    assert without == [line for line in with_created if "_created" not in line]
    assert len(without) < len(with_created)


def test_a_scrape_restricted_by_name_finds_the_families() -> None:
    """`/metrics?name[]=...` asks the registry for collectors by name (`describe`)."""
    served = ServedCounts()
    served.request_done("alpha", 200, "hit", 0.001)
    restricted = registry_of(served).restricted_registry(
        ["invoice_proxy_requests_total", "invoice_proxy_request_duration_seconds_count"]
    )
    page = generate_latest(restricted).decode()
    assert 'invoice_proxy_requests_total{caller="alpha",code="200"} 1.0' in page
    assert 'invoice_proxy_request_duration_seconds_count{cache="hit"} 1.0' in page
    assert "_bucket" not in page
    assert "invoice_proxy_cache_lookups_total" not in page
