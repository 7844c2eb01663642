"""The Grafana dashboard, answered by a real Prometheus that scrapes a running proxy.

`invoice-proxy demo` runs on free 127.0.0.1 ports (a PlanetScale stand-in and the
proxy) as a subprocess. Requests good and bad go through it, some of them made to
meet a failing, rate-limiting or drifted PlanetScale. Debian's `prometheus` server
scrapes the admin port every second; then every query of the dashboard, with its
template variables resolved as Grafana would, goes to Prometheus' HTTP API and must
return data. `promtool check metrics` lints the live /metrics page, and every metric
the alerts and the dashboard name must be on it.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from .manifests import ROOT, find_tool
from .processes import free_ports

DASHBOARD = ROOT / "deploy" / "grafana" / "invoice-proxy.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
JOB = "invoice-proxy"
NAMESPACE = "demo"  # a static label on the test's scrape target, as Kubernetes adds one

SCRAPE_INTERVAL_S = 1
# Grafana: max(4 x scrape interval, $__interval + scrape interval); a margin on top.
BUILTINS = {"__rate_interval": "10s", "__interval": "2s", "__range": "5m"}
STARTUP_TIMEOUT_S = 30.0
SCRAPES_WANTED = 6


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(test id, PromQL expression with template variables) for every panel target."""
    queries = []
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"{panel['id']}:{panel['title']}:{target['refId']}", target["expr"]))
    return queries


def template_variables() -> list[dict[str, Any]]:
    return list(load_dashboard()["templating"]["list"])


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


# --- The dashboard file itself --------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_a_place() -> None:
    panels = list(all_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_every_query_uses_the_datasource_variable_and_the_job() -> None:
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'job="$job"' in target["expr"], f"{panel['title']}: {target['expr']}"


def test_dashboard_shows_what_operators_asked_for() -> None:
    exprs = "\n".join(expr for _, expr in dashboard_queries())
    for metric in (
        "invoice_proxy_requests_total",
        "invoice_proxy_request_duration_seconds_bucket",
        "invoice_proxy_cache_lookups_total",
        "invoice_proxy_cache_bytes",
        "invoice_proxy_cache_entries",
        "invoice_proxy_upstream_requests_total",
        "invoice_proxy_upstream_duration_seconds_bucket",
        "invoice_proxy_upstream_circuit_state",
        "invoice_proxy_credential_version",
        "invoice_proxy_credential_last_reload_timestamp_seconds",
        "invoice_proxy_credential_reloads_total",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    assert "by (code)" in exprs and "by (caller)" in exprs
    assert "histogram_quantile(0.5, sum by (cache, le)" in exprs
    assert "histogram_quantile(0.99, sum by (cache, le)" in exprs
    assert "time() - max by (instance) (invoice_proxy_credential_last_reload" in exprs


# --- The live stack: demo, traffic, Prometheus ----------------------------------------


def fetch(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request to a server of this test on 127.0.0.1; status 0 when it cannot connect."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "http" and parts.hostname == "127.0.0.1", url
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        connection.close()


class Process:
    """A subprocess whose combined output is drained by a thread (a full pipe blocks it)."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def wait_for(what: str, check: Any, timeout: float, *procs: Process) -> Any:
    """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.proc.poll() is not None:
                pytest.fail(f"{what}: a process exited ({proc.proc.returncode}):\n{proc.output()}")
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s\n" + "\n".join(p.output() for p in procs))


@dataclass
class Live:
    """The running stack the live tests query."""

    prometheus: str  # base URL
    metrics_page: str  # the proxy's /metrics, read after the traffic
    statuses: dict[str, int] = field(default_factory=dict)

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = fetch("GET", url)
        assert status == 200, f"{status} from Prometheus for {expr!r}: {body[:500]!r}"
        answer: dict[str, Any] = json.loads(body)
        assert answer["status"] == "success", answer
        return dict(answer["data"])

    def label_values(self, selector: str, label: str) -> list[str]:
        url = f"{self.prometheus}/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": selector, "start": time.time() - 300}
        )
        status, body = fetch("GET", url)
        assert status == 200, body[:500]
        series = json.loads(body)["data"]
        return sorted({s[label] for s in series if label in s})


class Traffic:
    """Requests through the demo proxy: good and bad, then a steady mix in a thread."""

    def __init__(self, api: int, admin: int, upstream: int, key: str) -> None:
        self.base = f"http://127.0.0.1:{api}/v1/organizations"
        self.upstream = f"http://127.0.0.1:{upstream}"
        self.auth = {"Authorization": f"Bearer {key}"}
        self.statuses: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._steady, daemon=True)

    def get(self, path: str, auth: bool = True) -> int:
        return fetch("GET", f"{self.base}/{path}", self.auth if auth else {})[0]

    def misbehave(self, invoice_id: str, behaviour: dict[str, Any]) -> None:
        """Tell the demo's PlanetScale stand-in how to answer one invoice id."""
        body = json.dumps(behaviour).encode()
        url = f"{self.upstream}/_control/behave/{invoice_id}"
        status, _ = fetch("POST", url, {"Content-Type": "application/json"}, body)
        assert status == 200, f"stand-in control {url}: {status}"

    def mixed(self) -> None:
        drifted = {
            "id": "inv_drift",
            "total": "12.34",
            "billing_period_start": "2025-01-01T00:00:00.000Z",
            "billing_period_end": "2025-02-01T00:00:00.000Z",
            "paid": True,
            "overdue": False,
        }
        self.misbehave("inv_flaky", {"mode": "status", "status": 503, "times": 1})
        self.misbehave(
            "inv_busy", {"mode": "status", "status": 429, "retry_after": "0", "times": 1}
        )
        self.misbehave("inv_down", {"mode": "status", "status": 503})
        self.misbehave("inv_drift", {"mode": "body", "body": json.dumps(drifted)})
        for name, path, auth in (
            ("miss", "acme/invoices/inv_2025_01", True),
            ("hit", "acme/invoices/inv_2025_01", True),
            ("upstream 503 then 200", "acme/invoices/inv_flaky", True),
            ("upstream 429 then 200", "acme/invoices/inv_busy", True),
            ("upstream down", "acme/invoices/inv_down", True),
            ("schema drift", "acme/invoices/inv_drift", True),
            ("not found", "acme/invoices/missing-1", True),
            ("forbidden", "globex/invoices/inv_2025_01", True),
            ("no key", "acme/invoices/inv_2025_01", False),
            ("bad id", "acme/invoices/bad!id", True),
        ):
            self.statuses[name] = self.get(path, auth)

    def _steady(self) -> None:
        for i in range(10_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            self.get("acme/invoices/inv_2025_01")
            self.get(f"acme/invoices/inv_t{i}")
            self.get(f"acme/invoices/missing-{i % 3}")
            self.get("globex/invoices/inv_2025_01")
            self.get("acme/invoices/inv_2025_01", auth=False)
            self._stop.wait(0.05)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_bin = find_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    api, admin, upstream, prom_port = free_ports(4)
    started: list[Process] = []
    traffic: Traffic | None = None
    try:
        demo = Process(
            [sys.executable, "-m", "proxy", "demo", "--port", str(api),
             "--admin-port", str(admin), "--upstream-port", str(upstream)],
            cwd=ROOT,
        )  # fmt: skip
        started.append(demo)

        def caller_key() -> str | None:
            match = re.search(r"Authorization: Bearer ([A-Za-z0-9_\-]+)", "".join(demo.lines))
            return match.group(1) if match else None

        key = wait_for("the demo prints its curl lines", caller_key, STARTUP_TIMEOUT_S, demo)
        admin_url = f"http://127.0.0.1:{admin}"
        wait_for(
            "the demo is ready",
            lambda: fetch("GET", f"{admin_url}/readyz")[0] == 200,
            STARTUP_TIMEOUT_S,
            demo,
        )

        traffic = Traffic(api, admin, upstream, key)
        traffic.mixed()

        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": "15s",
            },
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{admin}"], "labels": {"namespace": NAMESPACE}}
                    ],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Process(
            [
                prometheus_bin,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            cwd=tmp,
        )
        started.append(prometheus)
        prom_url = f"http://127.0.0.1:{prom_port}"
        traffic.start()
        wait_for(
            "Prometheus is ready",
            lambda: fetch("GET", f"{prom_url}/-/ready")[0] == 200,
            STARTUP_TIMEOUT_S,
            prometheus,
        )
        stack = Live(prom_url, "", traffic.statuses)

        def scraped_enough() -> bool:
            expr = f'count_over_time(up{{job="{JOB}"}}[30s]) >= {SCRAPES_WANTED} and up == 1'
            return bool(stack.query(expr)["result"])

        wait_for(
            f"{SCRAPES_WANTED} successful scrapes",
            scraped_enough,
            STARTUP_TIMEOUT_S + SCRAPES_WANTED * SCRAPE_INTERVAL_S,
            demo,
            prometheus,
        )
        stack.metrics_page = fetch("GET", f"{admin_url}/metrics")[1].decode()
        yield stack
    finally:
        if traffic is not None:
            traffic.stop()
        for proc in reversed(started):
            proc.stop()


def test_live_metrics_page_passes_promtool_check_metrics(live: Live) -> None:
    result = subprocess.run(
        [find_tool("promtool"), "check", "metrics"],
        input=live.metrics_page,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_alerts_and_dashboard_name_is_exported(live: Live) -> None:
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", live.metrics_page, re.MULTILINE))
    exprs = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    exprs += [expr for _, expr in dashboard_queries()]
    named: set[str] = set()
    for expr in exprs:
        # Label lists (`by (instance, python_version)`) name labels, not metrics.
        expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
        named |= set(re.findall(r"\b((?:invoice_proxy|process|python)_[a-z0-9_]+)", expr))
    missing = sorted(named - exported)
    assert not missing, f"named by alerts or dashboard but not on /metrics: {missing}"


def test_the_traffic_reached_the_proxy_good_and_bad(live: Live) -> None:
    """The mix the queries below rely on: successes, refusals and upstream failures."""
    codes = set(live.statuses.values())
    assert {200, 401, 403, 404} <= codes, live.statuses
    assert any(code >= 500 for code in codes), live.statuses


def resolve_variables(live: Live) -> dict[str, str]:
    """Each template variable's value: the first value its query finds, as Grafana shows."""
    values: dict[str, str] = {}
    for variable in template_variables():
        if variable["type"] == "datasource":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(variable).strip())
        assert match, f"variable {variable['name']}: not a label_values() query"
        selector = substitute(match.group(1), values)
        found = live.label_values(selector, match.group(2))
        assert found, f"variable {variable['name']}: {selector} has no {match.group(2)} label"
        value = found[0]
        # Grafana escapes regex characters in multi-value and All-able variables.
        if variable.get("multi") or variable.get("includeAll"):
            value = re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value)
        values[variable["name"]] = value
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    names = {**BUILTINS, **values}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in names, f"unknown template variable ${name} in {expr!r}"
        return names[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


@pytest.fixture(scope="module")
def variables(live: Live) -> dict[str, str]:
    return resolve_variables(live)


def test_template_variables_resolve_to_the_running_proxy(variables: dict[str, str]) -> None:
    assert variables["job"] == JOB
    assert variables["namespace"] == NAMESPACE
    assert variables["caller"] == "demo"
    assert variables["instance"].startswith("127")


@pytest.mark.parametrize(
    ("panel", "expr"), dashboard_queries(), ids=[q[0] for q in dashboard_queries()]
)
def test_dashboard_query_returns_data(
    live: Live, variables: dict[str, str], panel: str, expr: str
) -> None:
    query = substitute(expr, variables)
    data = live.query(query)
    assert data["result"], f"{panel}: no data for\n{query}"
