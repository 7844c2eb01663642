"""TOML configuration -> frozen dataclasses.

Every problem is collected with its dotted key path (`cache.max_bytes: expected an
integer`), so `check-config` can print them all at once. Secrets never live here:
caller keys are SHA-256 digests and the PlanetScale token comes from a source.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .shared import SharedConfig

T = TypeVar("T")

_HEX64 = re.compile(r"[0-9a-f]{64}")
# SPEC: organization and invoice id are 1 to 64 characters of A-Z a-z 0-9 _ -
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALLER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every `path: message` line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ConfigFileError(ConfigError):
    """The file itself cannot be used (missing, unreadable, not UTF-8, not TOML): one problem,
    which does not name the file (the caller prints the path beside it)."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"  # noqa: S104 - a service in a pod listens on all interfaces
    port: int = 8080  # the API
    admin_port: int = 9090  # /metrics, /healthz, /readyz, cache purge
    shutdown_grace_s: float = 10.0  # in-flight requests get this long after SIGTERM
    keepalive_timeout_s: float = 75.0  # idle keep-alive connections are closed after this
    max_connections: int = 1024  # open connections on the API listener, beyond: refused
    request_timeout_s: float = 30.0  # to read a request head (and a new connection's first)
    max_line_size: int = 8190  # request line length, bytes
    max_field_size: int = 8190  # one header, bytes
    max_headers: int = 64  # headers in one request
    workers: int = 1  # processes sharing `port` (SO_REUSEPORT); worker i's admin: admin_port + i


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = "https://api.planetscale.com/v1"
    connect_timeout_s: float = 3.0  # TCP + TLS connect
    timeout_s: float = 10.0  # one upstream attempt, end to end
    deadline_s: float = 20.0  # all attempts for one caller request, backoff included
    retries: int = 2  # extra attempts after a 5xx, 429 or connection error
    backoff_base_s: float = 0.1  # first backoff, doubled each retry, full jitter
    backoff_max_s: float = 2.0  # cap on one backoff; a longer Retry-After goes to the caller
    max_connections: int = 32  # connection pool size
    max_concurrency: int = 32  # upstream requests in flight at once
    rate_per_s: float = 5.0  # token bucket on upstream requests (PlanetScale allows 10/s)
    burst: int = 10  # token bucket size
    # Longest wait for a rate token or a free slot, then 429. Whatever this says, a fetch
    # waits only while the deadline keeps one attempt's time (timeout_s, at most half
    # of deadline_s): with the defaults, up to 10 s, in turn with other callers.
    max_queue_wait_s: float = 20.0
    max_body_bytes: int = 65536  # an invoice body larger than this is invalid
    strict_schema: bool = False  # true: reject anything beyond the 2025 OpenAPI document
    circuit_failures: int = 5  # consecutive failures that open the circuit
    circuit_open_s: float = 10.0  # how long it stays open before a half-open probe
    # The fleet-wide budget, kept in Redis: used only with a [shared] table.
    fleet_rate_per_minute: float = 300.0  # all replicas together (PlanetScale: 600/min)
    fleet_burst: int = 10  # requests the fleet may send at once after a quiet spell
    # A longer wait for the fleet budget answers 429; also bounded, with the waits that
    # follow it, by the deadline less one attempt's time (see max_queue_wait_s).
    fleet_max_wait_s: float = 20.0


@dataclass(frozen=True, slots=True)
class FileSourceConfig:
    path: str = "/vault/secrets/planetscale.json"
    poll_interval_s: float = 1.0  # how often the file's stat is checked


@dataclass(frozen=True, slots=True)
class EnvSourceConfig:
    token_id_var: str = "PLANETSCALE_TOKEN_ID"
    token_var: str = "PLANETSCALE_TOKEN"


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str = ""
    mount: str = "secret"  # KV version 2 mount
    path: str = "planetscale/invoice-proxy"
    token_id_field: str = "token_id"
    token_field: str = "token"
    auth: str = "kubernetes"  # "token" | "approle" | "kubernetes"
    refresh_interval_s: float = 30.0  # poll period, +-10% jitter
    timeout_s: float = 5.0  # one Vault HTTP call
    namespace: str = ""  # X-Vault-Namespace (Vault Enterprise / HCP)
    ca_file: str = ""  # PEM bundle to verify Vault's TLS certificate
    # auth = "token"
    token_file: str = ""  # re-read when it changes
    token_env: str = "VAULT_TOKEN"  # used when token_file is empty
    # auth = "approle"
    approle_mount: str = "approle"
    role_id: str = ""
    secret_id_file: str = ""
    # auth = "kubernetes"
    kubernetes_mount: str = "kubernetes"
    role: str = ""
    jwt_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    source: str = "vault"  # "vault" | "file" | "env"
    file: FileSourceConfig = field(default_factory=FileSourceConfig)
    env: EnvSourceConfig = field(default_factory=EnvSourceConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_bytes: int = 268435456  # 256 MiB of cached invoices, overhead included
    open_period_ttl_s: float = 300.0  # invoices whose period is open, or unparsable
    not_found_ttl_s: float = 30.0  # remembered 404s; 0 turns it off
    stale_if_error_s: float = 86400.0  # expired entries served when PlanetScale fails


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_sha256: tuple[str, ...] = ()  # admin keys for the cache purge; empty: purge disabled


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "json"  # json | console


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str
    key_sha256: tuple[str, ...]
    organizations: tuple[str, ...]
    rate_per_s: float = 0.0  # this caller's request rate; 0: unlimited
    burst: int = 0  # token bucket size; 0: twice the rate, at least 1


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    credential: CredentialConfig = field(default_factory=CredentialConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    callers: tuple[CallerConfig, ...] = ()
    shared: SharedConfig | None = None  # [shared]: the fleet level on Redis; None: off


class _Section:
    """A TOML table being read: typed getters that record problems under a dotted path."""

    def __init__(self, data: dict[str, Any], path: str, problems: list[str]) -> None:
        self._data = data
        self._path = path
        self._problems = problems
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def problem(self, key: str, message: str) -> None:
        self._problems.append(f"{self._key(key)}: {message}")

    def _get(self, key: str, default: T, kind: str, accept: Callable[[Any], bool]) -> T:
        self._seen.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        if not accept(value):
            self.problem(key, f"expected {kind}")
            return default
        return value  # type: ignore[no-any-return]

    def required(self, key: str) -> bool:
        if key in self._data:
            return True
        self._seen.add(key)
        self.problem(key, "is required")
        return False

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default, "a string", lambda v: isinstance(v, str))
        if choices and value not in choices:
            self.problem(key, f"expected one of {', '.join(repr(c) for c in choices)}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, default, "a boolean", lambda v: isinstance(v, bool))

    def integer(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        value = self._get(
            key, default, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
        )
        return self._range(key, value, default, lo, hi)

    def number(
        self, key: str, default: float, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self._get(
            key,
            default,
            "a number",
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        )
        # TOML has nan and inf; compared with a bound, nan is never out of range, so a
        # `rate_per_s = nan` would pass and switch the cap off.
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(key, "expected a finite number")
            return default
        return float(self._range(key, value, default, lo, hi))

    def _range(self, key: str, value: T, default: T, lo: Any, hi: Any) -> T:
        if lo is not None and value < lo:
            self.problem(key, f"must be at least {lo}")
            return default
        if hi is not None and value > hi:
            self.problem(key, f"must be at most {hi}")
            return default
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(
            key,
            None,
            "an array of strings",
            lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
        )
        return default if value is None else tuple(value)

    def digests(self, key: str, *, required: bool) -> tuple[str, ...]:
        if required and not self.required(key):
            return ()
        digests = self.strings(key)
        if required and key in self._data and not digests and isinstance(self._data[key], list):
            self.problem(key, "must list at least one digest")
        for i, digest in enumerate(digests):
            if not _HEX64.fullmatch(digest):
                self.problem(f"{key}[{i}]", "expected 64 lowercase hex digits (a SHA-256 digest)")
        return digests

    def section(self, key: str) -> _Section:
        self._seen.add(key)
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "expected a table")
            value = {}
        return _Section(value, self._key(key), self._problems)

    def tables(self, key: str) -> Iterator[_Section]:
        self._seen.add(key)
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, "expected an array of tables ([[...]])")
            return
        for i, item in enumerate(value):
            yield _Section(item, f"{self._key(key)}[{i}]", self._problems)

    def finish(self) -> None:
        for key in self._data:
            if key not in self._seen:
                self.problem(key, "unknown key")


_HOST = re.compile(r"[A-Za-z0-9._-]+")  # a DNS name or an IPv4 address
# RFC 3986 path characters: the upstream client sends the path as it is written.
_URL_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")


def url_problem(
    value: str,
    schemes: tuple[str, ...] = ("http", "https"),
    *,
    expected: str = "expected an http:// or https:// URL",
    userinfo: str = "must not hold userinfo (user:password@)",
    query: bool = False,
) -> str | None:
    """What is wrong with `value` as a `scheme://host[:port][/path]` URL, or None.

    The message never quotes the value: a URL may carry a password in its userinfo.
    """
    if any(c.isspace() or not c.isprintable() for c in value):
        return "must not contain whitespace or control characters"
    if not value.isascii():
        return "must be ASCII (the host in punycode, the path percent-encoded)"
    try:
        url = urlsplit(value)
    except ValueError:
        return f"{expected} (it does not parse)"
    if url.scheme not in schemes or not value.lower().startswith(f"{url.scheme}://"):
        return expected
    netloc = url.netloc
    if "@" in netloc:
        return userinfo
    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "the host is not a valid IPv6 address"
        if not bracket or (rest and not rest.startswith(":")):
            return "the host is not a valid IPv6 address"
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = netloc.partition(":")
        if not host:
            return expected
        if not _HOST.fullmatch(host):
            return "the host must be a DNS name or an IP address"
        port = port_text if colon else None
    # Digits only: int() would also take "+80" or "0x50", which HTTP clients do not.
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return "the port must be a number from 1 to 65535"
    if not query and "?" in value:
        return "must not have a query (?...)"
    if "#" in value:
        return "must not have a fragment (#...)"
    if not _URL_PATH.fullmatch(url.path):
        return "the path holds a character a URL may not (percent-encode it)"
    return None


def _port(s: _Section, key: str, default: int) -> int:
    return s.integer(key, default, 0, 65535)  # 0: a free port, logged at start-up


def _server(s: _Section) -> ServerConfig:
    d = ServerConfig()
    c = ServerConfig(
        host=s.string("host", d.host),
        port=_port(s, "port", d.port),
        admin_port=_port(s, "admin_port", d.admin_port),
        shutdown_grace_s=s.number("shutdown_grace_s", d.shutdown_grace_s, 0, 3600),
        keepalive_timeout_s=s.number("keepalive_timeout_s", d.keepalive_timeout_s, 0, 3600),
        max_connections=s.integer("max_connections", d.max_connections, 1, 1_000_000),
        request_timeout_s=s.number("request_timeout_s", d.request_timeout_s, 0.1, 3600),
        max_line_size=s.integer("max_line_size", d.max_line_size, 256, 65536),
        max_field_size=s.integer("max_field_size", d.max_field_size, 256, 65536),
        max_headers=s.integer("max_headers", d.max_headers, 8, 1024),
        workers=s.integer("workers", d.workers, 1, 64),
    )
    if c.workers > 1:
        if c.port == 0 or c.admin_port == 0:
            s.problem("workers", "needs fixed ports (server.port and server.admin_port not 0)")
        elif c.admin_port <= c.port < c.admin_port + c.workers:
            s.problem("port", f"must not be a worker's admin port ({c.admin_port} and up)")
        elif c.admin_port + c.workers - 1 > 65535:
            s.problem("workers", "worker admin ports (admin_port + i) go beyond 65535")
    if c.port == c.admin_port and c.port != 0:
        s.problem("admin_port", "must differ from server.port")
    s.finish()
    return c


def _upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    c = UpstreamConfig(
        base_url=s.string("base_url", d.base_url).rstrip("/"),
        connect_timeout_s=s.number("connect_timeout_s", d.connect_timeout_s, 0.01, 300),
        timeout_s=s.number("timeout_s", d.timeout_s, 0.01, 300),
        deadline_s=s.number("deadline_s", d.deadline_s, 0.01, 600),
        retries=s.integer("retries", d.retries, 0, 10),
        backoff_base_s=s.number("backoff_base_s", d.backoff_base_s, 0, 60),
        backoff_max_s=s.number("backoff_max_s", d.backoff_max_s, 0, 600),
        max_connections=s.integer("max_connections", d.max_connections, 1, 10_000),
        max_concurrency=s.integer("max_concurrency", d.max_concurrency, 1, 10_000),
        rate_per_s=s.number("rate_per_s", d.rate_per_s, 0.001, 100_000),
        burst=s.integer("burst", d.burst, 1, 100_000),
        max_queue_wait_s=s.number("max_queue_wait_s", d.max_queue_wait_s, 0, 600),
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, 256, 16 * 1024 * 1024),
        strict_schema=s.boolean("strict_schema", d.strict_schema),
        circuit_failures=s.integer("circuit_failures", d.circuit_failures, 1, 10_000),
        circuit_open_s=s.number("circuit_open_s", d.circuit_open_s, 0.01, 3600),
        fleet_rate_per_minute=s.number(
            "fleet_rate_per_minute", d.fleet_rate_per_minute, 0.01, 1_000_000
        ),
        fleet_burst=s.integer("fleet_burst", d.fleet_burst, 1, 100_000),
        fleet_max_wait_s=s.number("fleet_max_wait_s", d.fleet_max_wait_s, 0, 600),
    )
    problem = url_problem(c.base_url)
    if problem:
        s.problem("base_url", problem)
    s.finish()
    return c


def _credential(s: _Section) -> CredentialConfig:
    source = s.string("source", "vault", ("vault", "file", "env"))
    f = s.section("file")
    fd = FileSourceConfig()
    file = FileSourceConfig(
        path=f.string("path", fd.path),
        poll_interval_s=f.number("poll_interval_s", fd.poll_interval_s, 0.05, 3600),
    )
    f.finish()
    e = s.section("env")
    ed = EnvSourceConfig()
    env = EnvSourceConfig(
        token_id_var=e.string("token_id_var", ed.token_id_var),
        token_var=e.string("token_var", ed.token_var),
    )
    e.finish()
    vault = _vault(s.section("vault"), required=source == "vault")
    s.finish()
    return CredentialConfig(source=source, file=file, env=env, vault=vault)


def _vault(v: _Section, required: bool) -> VaultConfig:
    d = VaultConfig()
    if required:
        v.required("address")
    c = VaultConfig(
        address=v.string("address", d.address).rstrip("/"),
        mount=v.string("mount", d.mount).strip("/"),
        path=v.string("path", d.path).strip("/"),
        token_id_field=v.string("token_id_field", d.token_id_field),
        token_field=v.string("token_field", d.token_field),
        auth=v.string("auth", d.auth, ("token", "approle", "kubernetes")),
        refresh_interval_s=v.number("refresh_interval_s", d.refresh_interval_s, 0.1, 86400),
        timeout_s=v.number("timeout_s", d.timeout_s, 0.01, 300),
        namespace=v.string("namespace", d.namespace),
        ca_file=v.string("ca_file", d.ca_file),
        token_file=v.string("token_file", d.token_file),
        token_env=v.string("token_env", d.token_env),
        approle_mount=v.string("approle_mount", d.approle_mount).strip("/"),
        role_id=v.string("role_id", d.role_id),
        secret_id_file=v.string("secret_id_file", d.secret_id_file),
        kubernetes_mount=v.string("kubernetes_mount", d.kubernetes_mount).strip("/"),
        role=v.string("role", d.role),
        jwt_file=v.string("jwt_file", d.jwt_file),
    )
    if required:
        problem = url_problem(c.address) if c.address else None
        if problem:
            v.problem("address", problem)
        if c.auth == "approle":
            if not c.role_id:
                v.problem("role_id", "is required when auth = 'approle'")
            if not c.secret_id_file:
                v.problem("secret_id_file", "is required when auth = 'approle'")
        if c.auth == "kubernetes" and not c.role:
            v.problem("role", "is required when auth = 'kubernetes'")
    v.finish()
    return c


def _cache(s: _Section) -> CacheConfig:
    d = CacheConfig()
    c = CacheConfig(
        max_bytes=s.integer("max_bytes", d.max_bytes, 0, 2**40),
        open_period_ttl_s=s.number("open_period_ttl_s", d.open_period_ttl_s, 0, 86400 * 365),
        not_found_ttl_s=s.number("not_found_ttl_s", d.not_found_ttl_s, 0, 86400 * 365),
        stale_if_error_s=s.number("stale_if_error_s", d.stale_if_error_s, 0, 86400 * 365),
    )
    s.finish()
    return c


def _callers(s: _Section) -> tuple[CallerConfig, ...]:
    callers = []
    names: set[str] = set()
    owners: dict[str, str] = {}
    for t in s.tables("callers"):
        ok = t.required("name")
        name = t.string("name", "")
        if ok and not _CALLER_NAME.fullmatch(name):
            t.problem("name", "expected 1 to 64 characters of A-Z a-z 0-9 _ . -")
        elif name in names:
            t.problem("name", f"duplicate caller name {name!r}")
        elif name == "unknown":
            t.problem("name", "'unknown' is reserved for unauthenticated requests")
        names.add(name)
        digests = t.digests("key_sha256", required=True)
        for i, digest in enumerate(digests):
            if digest in owners:
                t.problem(f"key_sha256[{i}]", f"this digest is also a key of {owners[digest]!r}")
            owners.setdefault(digest, name)
        has_orgs = t.required("organizations")
        orgs = t.strings("organizations")
        if has_orgs and isinstance(t._data.get("organizations"), list) and not orgs:
            t.problem("organizations", "must list at least one organization (or '*')")
        for i, org in enumerate(orgs):
            if org != "*" and not NAME_PATTERN.fullmatch(org):
                t.problem(f"organizations[{i}]", "expected '*' or 1 to 64 of A-Z a-z 0-9 _ -")
        rate = t.number("rate_per_s", 0.0, 0, 1_000_000)
        burst = t.integer("burst", 0, 0, 1_000_000)
        t.finish()
        callers.append(CallerConfig(name, digests, orgs, rate, burst))
    return tuple(callers)


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from a decoded TOML document; raise ConfigError with every problem."""
    problems: list[str] = []
    root = _Section(data, "", problems)
    server = _server(root.section("server"))
    upstream = _upstream(root.section("upstream"))
    credential = _credential(root.section("credential"))
    cache = _cache(root.section("cache"))
    a = root.section("admin")
    admin = AdminConfig(key_sha256=a.digests("key_sha256", required=False))
    a.finish()
    lg = root.section("logging")
    logging = LoggingConfig(
        level=lg.string("level", "info", ("debug", "info", "warning", "error")),
        format=lg.string("format", "json", ("json", "console")),
    )
    lg.finish()
    callers = _callers(root)
    shared = None
    if "shared" in data:
        from .shared import parse_shared  # it loads the Redis client: only when configured

        shared = parse_shared(root.section("shared"), upstream)
    if not callers and not problems:
        problems.append("callers: at least one [[callers]] table is required")
    root.finish()
    if problems:
        raise ConfigError(problems)
    return Config(server, upstream, credential, cache, admin, logging, callers, shared)


_MAX_FILE_BYTES = 4 * 1024 * 1024  # a configuration is a few KiB; beyond this, not one


def load_config(path: str) -> Config:
    """Read and parse a TOML file; every failure is a ConfigError naming the problem.

    A file that cannot be used at all raises ConfigFileError: one problem, no traceback,
    nothing of the file's content but what tomllib says about the place of an error.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except IsADirectoryError:
        raise ConfigFileError("is a directory, not a file") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigFileError(f"is larger than {_MAX_FILE_BYTES} bytes: not a configuration")
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark, as some editors write, is harmless
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigFileError(
            f"not UTF-8 (invalid byte at line {line}, column {column}); TOML files are UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"not valid TOML ({_one_line(str(exc))})") from None
    except RecursionError:
        raise ConfigFileError("not valid TOML (nested too deeply)") from None
    return parse_config(data)


def _one_line(message: str) -> str:
    """tomllib's message on one printable line (it may quote a character of the file)."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(message.split()))
