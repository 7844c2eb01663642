"""Prometheus metrics: one `Metrics` object owns its registry and every metric.

Names are the ones SPEC fixes; dashboards and alerts depend on them. Labels come
from bounded sets only (configured callers, HTTP status codes, fixed words).

The three families every cache hit adds to (requests, their durations, cache lookups)
are `ServedCounts`: plain numbers, exposed by a custom collector exactly as
prometheus_client's Counter and Histogram expose them. A prometheus_client child
takes a lock per increment and a histogram walks its buckets in Python, which cost
a hit some 20,000 CPU instructions; the rest are prometheus_client's own objects.
"""

from __future__ import annotations

import math
import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from . import __version__

# A cache hit is answered in well under a millisecond; a miss waits for PlanetScale.
REQUEST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
UPSTREAM_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)

CACHE_RESULTS = ("hit", "miss", "stale", "none")
# The cache's lookups: the `result` label of invoice_proxy_cache_lookups_total.
LOOKUP_RESULTS = ("hit", "miss", "stale", "coalesced")
# Every long-lived task (proxy.tasks.supervise): the `task` label of its failure count.
BACKGROUND_TASKS = ("credential_refresher", "jwks_refresher", "tls_watcher", "fleet_purges")


def _use_created() -> bool:
    """Whether `_created` samples are exported: prometheus_client's own reading of the
    variable (its flag, `prometheus_client.metrics._use_created`, is private)."""
    value = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False")
    return value.lower() not in ("true", "1", "t")


class Count:
    """One counter series as a plain number: its owner adds to `value` itself (a method
    call would cost the hot path a few hundred instructions more); `created` is its
    `_created` sample."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0
        self.created = created


class Durations:
    """One histogram series: observations per bucket (not cumulative), their sum."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self, buckets: int, created: float) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.created = created


class ServedCounts:
    """invoice_proxy_requests_total, invoice_proxy_request_duration_seconds and
    invoice_proxy_cache_lookups_total: plain numbers the hot path adds to, and the
    collector that exposes them as prometheus_client's Counter and Histogram would.

    No lock: only the event loop's thread adds, and /metrics collects on that thread
    too (`make_aiohttp_handler` renders in the handler). A reader on another thread
    still gets whole series: `collect` copies what it reads (a dict's items, a bucket
    list) in one step the GIL does not interrupt.
    """

    REQUESTS = "invoice_proxy_requests"
    DURATION = "invoice_proxy_request_duration_seconds"
    LOOKUPS = "invoice_proxy_cache_lookups"
    REQUESTS_HELP = "API requests answered, by caller and HTTP status."
    DURATION_HELP = "Time to answer an API request, by how the cache served it."
    LOOKUPS_HELP = "Invoice cache lookups by result."

    def __init__(self) -> None:
        self._use_created = _use_created()
        # Histogram's upper bounds: `bisect_left` finds the first that is >= a duration,
        # the bucket prometheus_client's walk finds; +Inf takes the rest.
        self._bounds = (*(float(b) for b in REQUEST_BUCKETS), math.inf)
        # `le` as prometheus_client writes it (its formatter has no annotations).
        self._le: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        # By (caller, status), in the order they were first seen (prometheus_client's).
        self._requests: dict[tuple[str, int], Count] = {}
        # Every `cache` and lookup result exists from the start. `created`: when the
        # series was, from time.time as prometheus_client takes it.
        self._durations = {c: Durations(len(self._bounds), time.time()) for c in CACHE_RESULTS}
        self.lookups: dict[str, Count] = {r: Count(time.time()) for r in LOOKUP_RESULTS}

    def request_done(self, caller: str, status: int, cache: str, seconds: float) -> None:
        """Count one answered API request, and how long it took (the hot path)."""
        try:
            self._requests[caller, status].value += 1
        except KeyError:
            self._new_request(caller, status).value += 1
        bounds = self._bounds
        # A hit falls in the first bucket: one comparison costs a tenth of bisect_left.
        bucket = 0 if seconds <= bounds[0] else bisect_left(bounds, seconds)
        durations = self._durations[cache]
        durations.counts[bucket] += 1
        durations.sum += seconds

    def init_callers(self, callers: Iterable[str]) -> None:
        for name in callers:
            if (name, 200) not in self._requests:
                self._new_request(name, 200)

    def _new_request(self, caller: str, status: int) -> Count:
        count = Count(time.time())
        self._requests[caller, status] = count
        return count

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: what the registry needs to know the names."""
        return [
            Metric(self.REQUESTS, self.REQUESTS_HELP, "counter"),
            Metric(self.DURATION, self.DURATION_HELP, "histogram"),
            Metric(self.LOOKUPS, self.LOOKUPS_HELP, "counter"),
        ]

    def collect(self) -> Iterable[Metric]:
        """The families with their samples, in prometheus_client's order: series in
        the order they were created, each one's samples as its Counter or Histogram
        child gives them."""
        requests, duration, lookups = self.describe()
        for (caller, status), count in list(self._requests.items()):
            self._counter(requests, {"caller": caller, "code": str(status)}, count)
        for cache, durations in list(self._durations.items()):
            self._histogram(duration, cache, durations)
        for result, count in list(self.lookups.items()):
            self._counter(lookups, {"result": result}, count)
        return [requests, duration, lookups]

    def _counter(self, family: Metric, labels: dict[str, str], count: Count) -> None:
        family.add_sample(family.name + "_total", labels, count.value)
        if self._use_created:
            family.add_sample(family.name + "_created", dict(labels), count.created)

    def _histogram(self, family: Metric, cache: str, durations: Durations) -> None:
        name = family.name
        counts = list(durations.counts)
        cumulative = 0.0
        for le, count in zip(self._le, counts, strict=True):
            cumulative += count
            family.add_sample(name + "_bucket", {"cache": cache, "le": le}, cumulative)
        family.add_sample(name + "_count", {"cache": cache}, cumulative)
        family.add_sample(name + "_sum", {"cache": cache}, durations.sum)
        if self._use_created:
            family.add_sample(name + "_created", {"cache": cache}, durations.created)


class Metrics:
    """Every metric of the service, in a registry of its own (two apps never collide)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, per_organization: bool = False
    ) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # With credential.per_organization, the credential series carry `organization`:
        # each named organization, and `other` for every one loaded on demand.
        self.per_organization = per_organization
        org: list[str] = ["organization"] if per_organization else []
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "invoice_proxy_build_info",
            "Always 1; the labels tell the running version.",
            ["version", "python_version"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python_version=platform.python_version()).set(1)

        self.served = ServedCounts()
        r.register(self.served)
        # The hot path's call, bound once: `Metrics.request_done` is `ServedCounts`'.
        self.request_done: Callable[[str, int, str, float], None] = self.served.request_done
        # By result, for the cache to count its lookups.
        self.cache_lookups: Mapping[str, Count] = self.served.lookups
        self.cache_entries = Gauge(
            "invoice_proxy_cache_entries", "Invoices (and 404s) held in the cache.", registry=r
        )
        self.cache_bytes = Gauge(
            "invoice_proxy_cache_bytes",
            "Memory the cache accounts for its entries (bodies, keys, overhead).",
            registry=r,
        )
        self.cache_evictions = Counter(
            "invoice_proxy_cache_evictions_total",
            "Entries dropped to stay within cache.max_bytes.",
            registry=r,
        )
        self.upstream_requests = Counter(
            "invoice_proxy_upstream_requests_total",
            "Requests sent to PlanetScale, by HTTP status, or timeout / error.",
            ["code"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "invoice_proxy_upstream_duration_seconds",
            "Time of one request to PlanetScale.",
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_schema_drift = Counter(
            "invoice_proxy_upstream_schema_drift_total",
            "Invoice bodies accepted beyond the 2025 OpenAPI document, by kind of drift.",
            ["kind"],
            registry=r,
        )
        self.upstream_invalid = Counter(
            "invoice_proxy_upstream_invalid_responses_total",
            "PlanetScale answers refused as not matching the invoice schema.",
            registry=r,
        )
        self.upstream_circuit_state = Gauge(
            "invoice_proxy_upstream_circuit_state",
            "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.upstream_throttled = Counter(
            "invoice_proxy_upstream_throttled_total",
            "Caller requests refused with 429 by the proxy's own upstream rate cap.",
            registry=r,
        )
        self.credential_loaded = Gauge(
            "invoice_proxy_credential_loaded",
            "1 while a credential is in hand (organization other: how many are).",
            org,
            registry=r,
        )
        self.credential_reloads = Counter(
            "invoice_proxy_credential_reloads_total",
            "Credential fetches from the source, by result.",
            [*org, "result"],
            registry=r,
        )
        self.credential_last_reload = Gauge(
            "invoice_proxy_credential_last_reload_timestamp_seconds",
            "Unix time of the last successful credential fetch.",
            org,
            registry=r,
        )
        self.credential_version = Gauge(
            "invoice_proxy_credential_version",
            "The Vault KV version of the credential in use (0 for other sources).",
            org,
            registry=r,
        )
        self.upstream_credential_rejections = Counter(
            "invoice_proxy_upstream_credential_rejections_total",
            "Times PlanetScale refused the proxy's token (401/403).",
            registry=r,
        )
        self.background_task_failures = Counter(
            "invoice_proxy_background_task_failures_total",
            "Exceptions a long-lived task survived (logged, backed off, retried), by task.",
            ["task"],
            registry=r,
        )
        self.caller_throttled = Counter(
            "invoice_proxy_caller_rate_limited_total",
            "Requests refused because the caller exceeded its own rate limit.",
            ["caller"],
            registry=r,
        )
        # Callers without shared secrets (JWTs, client certificates) and TLS.
        self.jwt_refusals = Counter(
            "invoice_proxy_jwt_refusals_total",
            "Bearer JWTs that named no caller, by reason.",
            ["reason"],
            registry=r,
        )
        self.jwks_refreshes = Counter(
            "invoice_proxy_jwks_refreshes_total",
            "Fetches of an issuer's JWKS, by result (failed: the keys in hand are kept).",
            ["issuer", "result"],
            registry=r,
        )
        self.jwks_keys = Gauge(
            "invoice_proxy_jwks_keys", "Signing keys in hand, by issuer.", ["issuer"], registry=r
        )
        self.tls_certificate_expiry = Gauge(
            "invoice_proxy_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the listener's certificate in use expires.",
            registry=r,
        )
        self.tls_reloads = Counter(
            "invoice_proxy_tls_reloads_total",
            "Loads of the listener's certificate and key, by result (failed: the last good "
            "pair is kept).",
            ["result"],
            registry=r,
        )
        # Pre-create the fixed label sets so every series exists from the start
        # (rate() over a series that appears late misses its first increments).
        for result in ("success", "failure"):
            self.tls_reloads.labels(result=result)
            if not per_organization:
                self.credential_reloads.labels(result=result)
        for task in BACKGROUND_TASKS:
            self.background_task_failures.labels(task=task)

    def init_callers(self, callers: list[str]) -> None:
        """Make each configured caller's success series exist from the start."""
        self.served.init_callers(callers)

    def init_organizations(self, names: list[str]) -> None:
        """With per_organization: each organization's credential series exist from the start."""
        for name in names:
            for result in ("success", "failure"):
                self.credential_reloads.labels(organization=name, result=result)
            self.credential_loaded.labels(organization=name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SharedMetrics:
    """The shared level's metrics (`[shared]` on only), in the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "invoice_proxy_shared_cache_lookups_total",
            "Local misses looked up in the shared cache: hit, miss (this replica asked "
            "PlanetScale), coalesced (another replica's answer awaited), unavailable, "
            "invalid (a stored value failed the check: dropped, fetched afresh).",
            ["result"],
            registry=registry,
        )
        self.errors = Counter(
            "invoice_proxy_shared_store_errors_total",
            "Redis commands that failed or timed out, by operation.",
            ["operation"],
            registry=registry,
        )
        self.budget = Counter(
            "invoice_proxy_fleet_budget_total",
            "Upstream requests before the fleet budget: granted, waited (granted after a "
            "short wait), refused (answered 429), unavailable (Redis down: local cap only), "
            "held (the fleet holds off after PlanetScale's 429 or an open circuit: answered "
            "429 or 503), probe (the fleet's one request after a hold).",
            ["result"],
            registry=registry,
        )
        self.up = Gauge(
            "invoice_proxy_shared_store_up",
            "1 while the shared store answers, 0 during an outage.",
            registry=registry,
        )
        for result in ("hit", "miss", "coalesced", "unavailable", "invalid"):
            self.lookups.labels(result=result)
        for operation in (
            "ping", "get", "claim", "release", "renew", "budget", "delete", "listen",
        ):  # fmt: skip
            self.errors.labels(operation=operation)
        for result in ("granted", "waited", "refused", "unavailable", "held", "probe"):
            self.budget.labels(result=result)
        self.up.set(1)
