"""`make soak`: concurrent callers against `invoice-proxy serve` over a mix of cache hits,
misses, 404s, refused requests and injected faults, for a while; then the checks.

The proxy runs as in production (a real process, its own event loop); the PlanetScale
stand-in and the callers run in this process. After a warm-up over the same mix, the
soak checks that every request got an answer, none was a 500 or outside the
documented statuses, the proxy's resident memory stayed within a margin, and the
proxy's metrics (requests, cache lookups, cache entries, upstream requests) agree with
what the callers saw and what the stand-in counted.

    python -m bench.soak [--duration 20] [--callers 50] [--no-write]

It prints its figures and, unless --no-write, puts them into bench/RESULTS.md under
"## Soak" (between markers; the rest of the file is left as it is). tests/test_soak.py
runs the same soak for a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.standin import Behaviour, StandIn, start

from .harness import (
    BENCH,
    ORGANIZATION,
    Processes,
    Proxy,
    metric_sum,
    proxy_config,
    start_proxy,
    write_credential,
)
from .report import RESULTS, SOAK_END, SOAK_START, write_soak_section

STOP_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 10.0  # a caller gives up (and counts a lost request) after this
# Statuses SPEC documents for the invoice endpoint.
DOCUMENTED = frozenset({200, 304, 400, 401, 403, 404, 405, 429, 502, 503, 504})


@dataclass(frozen=True)
class Mix:
    """What the callers ask for: weights of each kind of request, and the id sets."""

    hot: int = 100  # final invoices: cached once, then hits
    open_period: int = 200  # open billing periods: they expire quickly, so misses again
    missing: int = 50  # 404 from PlanetScale, remembered briefly
    faulty: int = 10  # per kind of fault below
    weights: tuple[tuple[str, int], ...] = (
        ("hit", 60),
        ("miss", 15),
        ("not_found", 10),
        ("fault", 10),
        ("refused", 5),
    )

    def ids(self) -> dict[str, list[str]]:
        return {
            "hit": [f"inv_hot_{i}" for i in range(self.hot)],
            "miss": [f"open-{i}" for i in range(self.open_period)],
            "not_found": [f"missing-{i}" for i in range(self.missing)],
            "fault": [f"{kind}-{i}" for kind in FAULTS for i in range(self.faulty)],
        }


# Injected faults, by id prefix, with the proxy's upstream settings below (attempt
# timeout 0.3 s, deadline 0.8 s, 2 retries, backoff at most 50 ms). One Behaviour per
# id: "times" counts down.
FAULTS: dict[str, Callable[[], Behaviour]] = {
    "flaky": lambda: Behaviour("status", status=500),  # 502 upstream_error, 3 attempts
    "slow": lambda: Behaviour("slow", delay_s=1.0),  # 504 upstream_timeout at the deadline
    "reset": lambda: Behaviour("reset"),  # 502 upstream_error
    "malformed": lambda: Behaviour("malformed"),  # 502 upstream_invalid_response, no retry
    "limited": lambda: Behaviour("status", status=429, retry_after="30"),  # 429 at once
    "flapping": lambda: Behaviour("status", status=503, times=2),  # 200 on the 3rd attempt
}


def _config(upstream_url: str, credential: Path, caller_key: str) -> Callable[[int, int], str]:
    """The soak's proxy: short upstream timeouts and freshness, so faults and misses recur."""

    def config(port: int, admin_port: int) -> str:
        return proxy_config(
            port=port,
            admin_port=admin_port,
            upstream_url=upstream_url,
            credential=credential,
            caller="soak",
            caller_key=caller_key,
            server={"shutdown_grace_s": 5},
            upstream={
                "timeout_s": 0.3,
                "deadline_s": 0.8,
                "retries": 2,
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.05,
                "rate_per_s": 5000.0,
                "burst": 5000,
                "max_queue_wait_s": 0.2,
                "circuit_failures": 5,
                "circuit_open_s": 0.5,
            },
            cache={
                "max_bytes": 67108864,
                "open_period_ttl_s": 0.5,
                "not_found_ttl_s": 0.5,
                "stale_if_error_s": 3600,
            },
            logging={"level": "warning"},
        )

    return config


@dataclass
class Tally:
    """What the callers sent and what came back."""

    sent: int = 0
    answered: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, int]] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Report:
    """A soak's figures and its checks."""

    duration_s: float
    callers: int
    tally: Tally
    rss_before: int
    rss_after: int
    rss_margin: int
    metrics: dict[str, float]
    standin_requests: int
    standin_by_invoice: dict[str, int]
    cached_ids: int  # ids with an answer the cache keeps (200 or 404), per the stand-in
    exit_code: int | None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, passed, detail in self.checks if not passed]


class Plan:
    """Chooses each caller's next request from the mix (seeded: a soak is repeatable)."""

    def __init__(self, mix: Mix, base_url: str, caller_key: str) -> None:
        self._ids = mix.ids()
        self._kinds = [kind for kind, _ in mix.weights]
        self._weights = [weight for _, weight in mix.weights]
        self._base = base_url
        self._auth = {"Authorization": f"Bearer {caller_key}"}

    def pick(self, rng: random.Random) -> tuple[str, str, dict[str, str]]:
        kind = rng.choices(self._kinds, self._weights)[0]
        if kind == "refused":
            return rng.choice(
                [
                    ("refused", self._path(ORGANIZATION, "inv_hot_0"), {}),  # 401
                    ("refused", self._path("globex", "inv_hot_0"), self._auth),  # 403
                    ("refused", self._path(ORGANIZATION, "bad.id"), self._auth),  # 400
                ]
            )
        return kind, self._path(ORGANIZATION, rng.choice(self._ids[kind])), self._auth

    def everything(self) -> Iterator[tuple[str, str, dict[str, str]]]:
        """Each id once: the warm-up's first pass."""
        for kind, ids in self._ids.items():
            for invoice_id in ids:
                yield kind, self._path(ORGANIZATION, invoice_id), self._auth

    def _path(self, organization: str, invoice_id: str) -> str:
        return f"{self._base}/v1/organizations/{organization}/invoices/{invoice_id}"


async def _one(
    session: aiohttp.ClientSession, request: tuple[str, str, dict[str, str]], tally: Tally
) -> None:
    kind, url, headers = request
    tally.sent += 1
    start = time.perf_counter()
    try:
        async with session.get(url, headers=headers) as response:
            await response.read()
            tally.answered += 1
            tally.statuses[response.status] += 1
            tally.by_kind[(kind, response.status)] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.lost[type(exc).__name__] += 1
    tally.latencies.append(time.perf_counter() - start)


async def _load(plan: Plan, callers: int, duration_s: float, seed: int) -> Tally:
    """`callers` concurrent callers, one request in flight each, for `duration_s`."""
    tally = Tally()
    stop_at = time.monotonic() + duration_s
    connector = aiohttp.TCPConnector(limit=callers, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async def caller(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        while time.monotonic() < stop_at:
            await _one(session, plan.pick(rng), tally)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(caller(n) for n in range(callers)))
    return tally


async def _warm(plan: Plan, callers: int, seconds: float) -> Tally:
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=callers)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        requests = list(plan.everything())
        # The final invoices first, one at a time, with nothing else taking the CPU: a
        # first fetch slower than upstream.timeout_s (0.3 s here) would be retried, and
        # the check "each final invoice fetched once" would count the retry.
        for request in (r for r in requests if r[0] == "hit"):
            await _one(session, request, tally)
        requests = [r for r in requests if r[0] != "hit"]
        for i in range(0, len(requests), callers):
            await asyncio.gather(*(_one(session, r, tally) for r in requests[i : i + callers]))
    if seconds > 0:
        more = await _load(plan, callers, seconds, seed=0)
        tally.sent += more.sent
        tally.answered += more.answered
    return tally


# The soak runs the proxy from source, with this interpreter.
PROXY_COMMAND = (sys.executable, "-m", "proxy")
TOKEN_ID = "pscale_tkn_id_soak"
TOKEN = "pscale_tkn_" + "s0ak" * 10


def _standin(mix: Mix) -> StandIn:
    standin = StandIn([f"{TOKEN_ID}:{TOKEN}"])
    for kind, behaviour in FAULTS.items():
        for i in range(mix.faulty):
            standin.behave(f"{kind}-{i}", behaviour())
    return standin


async def soak(
    duration_s: float,
    callers: int,
    *,
    warm_s: float = 2.0,
    rss_margin: int = 8 * 1024 * 1024,
    workdir: Path | None = None,
) -> Report:
    """Run one soak and return its figures and checks (it raises only if nothing runs)."""
    mix = Mix()
    caller_key = secrets.token_urlsafe(32)
    standin = _standin(mix)
    runner, standin_port = await start(standin)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        credential = write_credential(workdir, TOKEN_ID, TOKEN)
        config = _config(f"http://127.0.0.1:{standin_port}/v1", credential, caller_key)
        processes = Processes()
        try:
            # A real process, not pinned, started and waited for off the event loop:
            # the stand-in answers on this loop meanwhile.
            proxy: Proxy = await asyncio.to_thread(
                start_proxy, processes, workdir, "proxy", config, core=None, command=PROXY_COMMAND
            )
            plan = Plan(mix, proxy.url, caller_key)
            await _warm(plan, callers, warm_s)
            await asyncio.sleep(0.2)
            before_metrics = await asyncio.to_thread(proxy.metrics)
            rss_before = proxy.rss()
            started = time.monotonic()
            tally = await _load(plan, callers, duration_s, seed=1)
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.2)  # let the last fetches of coalesced waiters settle
            rss_after = proxy.rss()
            after_metrics = await asyncio.to_thread(proxy.metrics)
        finally:
            await asyncio.to_thread(processes.stop_all, STOP_TIMEOUT_S)
            await runner.cleanup()
        exit_code = proxy.process.returncode
    stats = standin.stats
    by_invoice = dict(stats.by_invoice)
    ids = mix.ids()
    # What the cache keeps: 200s and 404s (flapping ids answer on their third attempt).
    flapping = [i for i in ids["fault"] if i.startswith("flapping-")]
    cacheable = ids["hit"] + ids["miss"] + ids["not_found"] + flapping
    report = Report(
        duration_s=elapsed,
        callers=callers,
        tally=tally,
        rss_before=rss_before,
        rss_after=rss_after,
        rss_margin=rss_margin,
        metrics={k: after_metrics[k] - before_metrics.get(k, 0.0) for k in after_metrics},
        standin_requests=stats.requests,
        standin_by_invoice=by_invoice,
        cached_ids=sum(1 for i in cacheable if by_invoice.get(i)),
        exit_code=exit_code,
    )
    report.checks = _checks(report, after_metrics, ids)
    return report


def _checks(
    r: Report, totals: dict[str, float], ids: dict[str, list[str]]
) -> list[tuple[str, bool, str]]:
    """Each check: name, passed, the figures behind it. `r.metrics` are soak-only deltas;
    `totals` include the warm-up (the stand-in's counters do too)."""
    t = r.tally
    m = r.metrics
    refused = t.statuses[400] + t.statuses[401] + t.statuses[403]
    lookups = sum(
        metric_sum(m, "invoice_proxy_cache_lookups_total", result=result)
        for result in ("hit", "miss", "coalesced")
    )
    upstream_total = metric_sum(totals, "invoice_proxy_upstream_requests_total")
    upstream_404 = metric_sum(totals, "invoice_proxy_upstream_requests_total", code="404")
    standin_404 = sum(r.standin_by_invoice.get(i, 0) for i in ids["not_found"])
    # A missing id the stand-in answered after the proxy's attempt timed out (a host that
    # stalls past upstream.timeout_s) counts as a timeout, and its retry as the 404: at
    # most as many as the timeouts beyond those of the slow faults, which all time out.
    timeouts = metric_sum(totals, "invoice_proxy_upstream_requests_total", code="timeout")
    slow = sum(n for i, n in r.standin_by_invoice.items() if i.startswith("slow-"))
    late_404, unexplained_timeouts = standin_404 - upstream_404, timeouts - slow
    hot_fetches = [r.standin_by_invoice.get(i, 0) for i in ids["hit"]]
    entries = totals.get("invoice_proxy_cache_entries", -1.0)
    odd = sorted(s for s in t.statuses if s not in DOCUMENTED)
    growth = r.rss_after - r.rss_before
    return [
        ("every request answered", t.sent == t.answered and not t.lost,
         f"sent {t.sent}, answered {t.answered}, lost {dict(t.lost)}"),
        ("no 500, only documented statuses", t.statuses[500] == 0 and not odd,
         f"statuses {dict(sorted(t.statuses.items()))}"),
        ("memory within margin", growth <= r.rss_margin,
         f"RSS {r.rss_before / 2**20:.1f} -> {r.rss_after / 2**20:.1f} MiB "
         f"(margin {r.rss_margin / 2**20:.0f} MiB)"),
        ("requests metric = answers", metric_sum(m, "invoice_proxy_requests_total") == t.answered,
         f"{metric_sum(m, 'invoice_proxy_requests_total'):.0f} counted, {t.answered} answered"),
        ("cache lookups = requests past auth", lookups == t.answered - refused,
         f"hit+miss+coalesced {lookups:.0f}, answered {t.answered} - refused {refused}"),
        ("cache entries = ids PlanetScale answered", entries == r.cached_ids,
         f"invoice_proxy_cache_entries {entries:.0f}, stand-in ids {r.cached_ids}"),
        ("upstream requests = stand-in requests", upstream_total == r.standin_requests,
         f"metric {upstream_total:.0f}, stand-in {r.standin_requests}"),
        ("upstream 404s = stand-in requests for missing ids, but for late ones",
         0 <= late_404 <= unexplained_timeouts,
         f"metric {upstream_404:.0f}, stand-in {standin_404}; answered after the proxy's"
         f" timeout {late_404:.0f}, of {unexplained_timeouts:.0f} timeouts beyond the slow"
         " faults'"),
        ("each final invoice fetched once", set(hot_fetches) == {1},
         f"fetches per hot invoice {sorted(set(hot_fetches))}"),
        ("clean shutdown", r.exit_code == 0, f"exit code {r.exit_code}"),
    ]  # fmt: skip


def markdown(r: Report) -> str:
    t = r.tally
    rate = t.answered / r.duration_s if r.duration_s else 0.0
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(t.statuses.items()))
    checks = "\n".join(
        f"- {'PASS' if passed else 'FAIL'} {name}: {detail}" for name, passed, detail in r.checks
    )
    median = statistics.median(t.latencies) * 1000 if t.latencies else 0.0
    latency = f"{median:.2f} / {t.percentile_ms(0.99):.2f} / {t.percentile_ms(1.0):.1f} ms"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    return f"""\
{SOAK_START}
## Soak

Run `make soak` (`python -m bench.soak`); this section is rewritten by each run.
Run of {when}, {machine}.

`invoice-proxy serve` as a process; the PlanetScale stand-in and {r.callers} concurrent
callers (one request in flight each) in the soak's process, all on 127.0.0.1. Mix: 60%
hits on 100 final invoices, 15% misses on 200 open-period invoices (fresh for 0.5 s),
10% 404s on 50 ids (remembered 0.5 s), 10% injected faults (500s, slow past the 0.8 s
deadline, resets, malformed bodies, 429 with Retry-After 30, 503 twice then 200), 5%
refused (401, 403, 400). Figures after a warm-up over the same mix; the memory is the
proxy's VmRSS.

| figure | value |
| --- | --- |
| duration | {r.duration_s:.1f} s |
| requests sent / answered | {t.sent} / {t.answered} |
| answers per second | {rate:,.0f} |
| latency p50 / p99 / max | {latency} |
| statuses | {statuses} |
| proxy RSS before / after | {r.rss_before / 2**20:.1f} / {r.rss_after / 2**20:.1f} MiB |
| upstream requests (stand-in, warm-up included) | {r.standin_requests} |

{checks}
{SOAK_END}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (20)")
    parser.add_argument("--callers", type=int, default=50, help="concurrent callers (50)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    print(f"soak: {args.callers} callers for {args.duration:.0f} s (after a warm-up)")
    report = asyncio.run(soak(args.duration, args.callers))
    section = markdown(report)
    print(section.replace(SOAK_START + "\n", "").replace(SOAK_END + "\n", ""))
    if not args.no_write:
        write_soak_section(section)
        print(f"written: {RESULTS.relative_to(BENCH.parent)}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
