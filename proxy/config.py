"""TOML configuration -> frozen dataclasses, each key declared once.

A key is a field of its section's dataclass: the default, range, unit and checks sit
together in the field's metadata (`key()`), and one reader (`_read`) walks
`dataclasses.fields`, taking each key's type from its annotation. Rules between keys
are small functions run once a table's keys are read (`_RULES`).

Every problem is collected with its dotted key path (`cache.max_bytes: expected an
integer`), so `check-config` can print them all at once. Secrets never live here:
caller keys are SHA-256 digests and the PlanetScale token comes from a source.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

T = TypeVar("T")

_HEX64 = re.compile(r"[0-9a-f]{64}")
# SPEC: organization and invoice id are 1 to 64 characters of A-Z a-z 0-9 _ -
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALLER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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


def _redis_url_problem(value: str) -> str | None:
    return url_problem(
        value,
        ("redis", "rediss"),
        expected="expected a redis:// or rediss:// (TLS) URL",
        userinfo="must not hold credentials: name the user in shared.username and the "
        "password's file in shared.password_file",
        query=True,  # redis-py reads connection options from the query
    )


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(_HOST.fullmatch(host)) and port.isdigit() and 0 < int(port) < 65536


def _no_trailing_slash(value: str) -> str:
    return value.rstrip("/")


def _no_outer_slashes(value: str) -> str:
    return value.strip("/")


def _is_organization(value: str) -> bool:
    return value == "*" or NAME_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Key:
    """What one configuration key accepts; it sits in the metadata of the key's field.

    The type comes from the field's annotation: str, bool, int, float, tuple[str, ...],
    a section dataclass (a sub-table), a tuple of them (an array of tables), or one
    `| None` (an optional table: None when absent).
    """

    unit: str = ""  # of a number: "s" (seconds), "bytes", "per second"...
    doc: str = ""
    lo: float | None = None  # a number's range, both ends included
    hi: float | None = None
    choices: tuple[str, ...] = ()  # a string's only values
    # Must be in its table (when the table is in use); `fallback` stands in meanwhile
    # for a key whose field has no default.
    required: bool = False
    fallback: object = None
    tidy: Callable[[str], str] | None = None  # a string as it is kept (e.g. no trailing /)
    items: Callable[[str], object] | None = None  # each string of an array must pass, else:
    item_problem: str = ""  # the problem, named by the string's index
    nonempty: str = ""  # an array given empty is this problem
    # A URL check, run after the table's other keys (so problems list in that order).
    url: Callable[[str], str | None] | None = None
    # A check that needs more than the value (the table's other keys, earlier tables of
    # an array), run as soon as the key is read.
    check: Callable[[Any, _Table], None] | None = None
    # A sub-table is in use only while this sibling key has this value; a table not in
    # use is read for types and ranges only (nothing required, no URL check, no rules).
    used_when: tuple[str, str] | None = None


_KEY = "proxy.config"  # where a field's metadata keeps its Key
_PLAIN = Key()


def key(default: T, **spec: Any) -> T:
    """A key with a default; `spec` holds the other `Key` attributes."""
    return field(default=default, metadata={_KEY: Key(**spec)})


def needed(fallback: T, **spec: Any) -> T:
    """A key every table must give: its field has no default (`fallback` is for reading)."""
    meta = {_KEY: Key(required=True, fallback=fallback, **spec)}
    return field(metadata=meta)  # type: ignore[no-any-return]


# A caller table's checks against the callers before it; run as each key is read, so a
# caller's problems keep the order of its keys.


def _caller_name(name: str, t: _Table) -> None:
    if t.has("name") and not _CALLER_NAME.fullmatch(name):
        t.problem("name", "expected 1 to 64 characters of A-Z a-z 0-9 _ . -")
    elif name in {caller.name for caller in t.earlier}:
        t.problem("name", f"duplicate caller name {name!r}")
    elif name == "unknown":
        t.problem("name", "'unknown' is reserved for unauthenticated requests")


def _caller_digests(digests: tuple[str, ...], t: _Table) -> None:
    owners: dict[str, str] = {}
    for caller in t.earlier:
        for digest in caller.key_sha256:
            owners.setdefault(digest, caller.name)
    for i, digest in enumerate(digests):
        if digest in owners:
            t.problem(f"key_sha256[{i}]", f"this digest is also a key of {owners[digest]!r}")
        owners.setdefault(digest, t.values["name"])


_DIGEST_PROBLEM = "expected 64 lowercase hex digits (a SHA-256 digest)"
_YEAR = 86400 * 365  # seconds


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """`[server.tls]`: HTTPS on the API listener (and the admin one with `admin`)."""

    cert_file: str = key("", required=True, doc="PEM chain; re-read when it or the key changes")
    key_file: str = key("", required=True, doc="PEM private key")
    client_ca_file: str = key(
        "", doc="set: callers may present a client certificate signed by this CA"
    )
    admin: bool = key(False, doc="true: the admin listener serves HTTPS with the same pair")
    poll_interval_s: float = key(
        1.0, lo=0.05, hi=3600, unit="s", doc="how often the pair's files are checked for a change"
    )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = key("0.0.0.0")  # noqa: S104 - a service in a pod listens on all interfaces
    port: int = key(8080, lo=0, hi=65535, doc="the API; 0: a free port, logged at start-up")
    admin_port: int = key(
        9090, lo=0, hi=65535, doc="/metrics, /healthz, /readyz, cache purge; 0: a free port"
    )
    shutdown_grace_s: float = key(
        10.0, lo=0, hi=3600, unit="s", doc="in-flight requests get this long after SIGTERM"
    )
    keepalive_timeout_s: float = key(
        75.0, lo=0, hi=3600, unit="s", doc="idle keep-alive connections are closed after this"
    )
    max_connections: int = key(
        1024, lo=1, hi=1_000_000, doc="open connections on the API listener, beyond: refused"
    )
    request_timeout_s: float = key(
        30.0, lo=0.1, hi=3600, unit="s", doc="to read a request head (and a new connection's first)"
    )
    max_line_size: int = key(8190, lo=256, hi=65536, unit="bytes", doc="request line length")
    max_field_size: int = key(8190, lo=256, hi=65536, unit="bytes", doc="one header")
    max_headers: int = key(64, lo=8, hi=1024, doc="headers in one request")
    workers: int = key(
        1, lo=1, hi=64, doc="processes sharing `port` (SO_REUSEPORT); worker i: admin_port + i"
    )
    fast_lane: bool = key(
        True, doc="cache hits answered on the connection itself; false: all through aiohttp"
    )
    tls: TlsConfig | None = None  # [server.tls]: HTTPS; None: plain HTTP


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = key("https://api.planetscale.com/v1", tidy=_no_trailing_slash, url=url_problem)
    connect_timeout_s: float = key(3.0, lo=0.01, hi=300, unit="s", doc="TCP + TLS connect")
    timeout_s: float = key(10.0, lo=0.01, hi=300, unit="s", doc="one upstream attempt, end to end")
    deadline_s: float = key(
        20.0, lo=0.01, hi=600, unit="s", doc="all attempts of one caller request, backoff included"
    )
    retries: int = key(2, lo=0, hi=10, doc="extra attempts after a 5xx, 429 or connection error")
    backoff_base_s: float = key(
        0.1, lo=0, hi=60, unit="s", doc="first backoff, doubled each retry, full jitter"
    )
    backoff_max_s: float = key(
        2.0, lo=0, hi=600, unit="s", doc="cap on one backoff; a longer Retry-After: to the caller"
    )
    max_connections: int = key(32, lo=1, hi=10_000, doc="connection pool size")
    max_concurrency: int = key(32, lo=1, hi=10_000, doc="upstream requests in flight at once")
    rate_per_s: float = key(
        5.0, lo=0.001, hi=100_000, unit="per second", doc="token bucket (PlanetScale allows 10/s)"
    )
    burst: int = key(10, lo=1, hi=100_000, unit="requests", doc="token bucket size")
    # Whatever this says, a fetch waits only while the deadline keeps one attempt's time
    # (timeout_s, at most half of deadline_s): with the defaults, up to 10 s, in turn
    # with other callers.
    max_queue_wait_s: float = key(
        20.0, lo=0, hi=600, unit="s", doc="longest wait for a rate token or a free slot, then 429"
    )
    max_body_bytes: int = key(
        65536, lo=256, hi=16 * 1024 * 1024, unit="bytes", doc="a larger invoice body is invalid"
    )
    strict_schema: bool = key(False, doc="true: reject anything beyond the 2025 OpenAPI document")
    circuit_failures: int = key(
        5, lo=1, hi=10_000, doc="consecutive failures that open the circuit"
    )
    circuit_open_s: float = key(
        10.0, lo=0.01, hi=3600, unit="s", doc="how long it stays open before a half-open probe"
    )
    # The fleet-wide budget, kept in Redis: used only with a [shared] table.
    fleet_rate_per_minute: float = key(
        300.0, lo=0.01, hi=1_000_000, unit="per minute", doc="all replicas (PlanetScale: 600)"
    )
    fleet_burst: int = key(
        10, lo=1, hi=100_000, unit="requests", doc="the fleet's at once, after a quiet spell"
    )
    # Also bounded, with the waits that follow it, by the deadline less one attempt's
    # time (see max_queue_wait_s).
    fleet_max_wait_s: float = key(
        20.0, lo=0, hi=600, unit="s", doc="a longer wait for the fleet budget answers 429"
    )


@dataclass(frozen=True, slots=True)
class FileSourceConfig:
    path: str = key("/vault/secrets/planetscale.json")
    poll_interval_s: float = key(
        1.0, lo=0.05, hi=3600, unit="s", doc="how often the file's stat is checked"
    )


@dataclass(frozen=True, slots=True)
class EnvSourceConfig:
    token_id_var: str = key("PLANETSCALE_TOKEN_ID")
    token_var: str = key("PLANETSCALE_TOKEN")


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str = key("", required=True, tidy=_no_trailing_slash, url=url_problem)
    mount: str = key("secret", tidy=_no_outer_slashes, doc="KV version 2 mount")
    path: str = key("planetscale/invoice-proxy", tidy=_no_outer_slashes)
    token_id_field: str = key("token_id")
    token_field: str = key("token")
    auth: str = key("kubernetes", choices=("token", "approle", "kubernetes"))
    refresh_interval_s: float = key(
        30.0, lo=0.1, hi=86400, unit="s", doc="poll period, +-10% jitter"
    )
    timeout_s: float = key(5.0, lo=0.01, hi=300, unit="s", doc="one Vault HTTP call")
    namespace: str = key("", doc="X-Vault-Namespace (Vault Enterprise / HCP)")
    ca_file: str = key("", doc="PEM bundle to verify Vault's TLS certificate")
    # auth = "token"
    token_file: str = key("", doc="re-read when it changes")
    token_env: str = key("VAULT_TOKEN", doc="used when token_file is empty")
    # auth = "approle"
    approle_mount: str = key("approle", tidy=_no_outer_slashes)
    role_id: str = key("")
    secret_id_file: str = key("")
    # auth = "kubernetes"
    kubernetes_mount: str = key("kubernetes", tidy=_no_outer_slashes)
    role: str = key("")
    jwt_file: str = key("/var/run/secrets/kubernetes.io/serviceaccount/token")


# With credential.per_organization, the placeholders a source's path or variable names
# hold; each is replaced by the requested organization (upper case, - as _, in names).
ORGANIZATION_PLACEHOLDER = "{organization}"
ORGANIZATION_VAR_PLACEHOLDER = "{ORGANIZATION}"


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    source: str = key("vault", choices=("vault", "file", "env"))
    per_organization: bool = key(
        False, doc="true: each organization's token from its own secret, file or variables"
    )
    # With per_organization: the organizations named in [[callers]] are always held;
    # those of callers with ["*"] are loaded on their first request, up to this many.
    max_on_demand: int = key(
        32, lo=0, hi=10_000, doc="tokens loaded on demand (for ['*']), least recently used out"
    )
    missing_ttl_s: float = key(
        10.0, lo=0.1, hi=3600, unit="s", doc="a failed on-demand load is answered 503 this long"
    )
    file: FileSourceConfig = field(default_factory=FileSourceConfig)
    env: EnvSourceConfig = field(default_factory=EnvSourceConfig)
    vault: VaultConfig = field(
        default_factory=VaultConfig, metadata={_KEY: Key(used_when=("source", "vault"))}
    )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_bytes: int = key(
        268435456, lo=0, hi=2**40, unit="bytes", doc="256 MiB of cached invoices, overhead included"
    )
    open_period_ttl_s: float = key(
        300.0, lo=0, hi=_YEAR, unit="s", doc="invoices whose period is open, or unparsable"
    )
    not_found_ttl_s: float = key(
        30.0, lo=0, hi=_YEAR, unit="s", doc="remembered 404s; 0 turns it off"
    )
    stale_if_error_s: float = key(
        86400.0, lo=0, hi=_YEAR, unit="s", doc="expired entries served when PlanetScale fails"
    )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_sha256: tuple[str, ...] = key(
        (),
        items=_HEX64.fullmatch,
        item_problem=_DIGEST_PROBLEM,
        doc="admin keys for the cache purge; empty: purge disabled",
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = key("info", choices=("debug", "info", "warning", "error"))
    format: str = key("json", choices=("json", "console"))


def _issuer_name(name: str, t: _Table) -> None:
    if t.has("name") and not _CALLER_NAME.fullmatch(name):
        t.problem("name", "expected 1 to 64 characters of A-Z a-z 0-9 _ . -")
    elif name in {issuer.name for issuer in t.earlier}:
        t.problem("name", f"duplicate issuer name {name!r}")


def _issuer_iss(iss: str, t: _Table) -> None:
    if iss and iss in {issuer.issuer for issuer in t.earlier}:
        t.problem("issuer", "another [[issuers]] table has this issuer")


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """`[[issuers]]`: a JWT issuer whose tokens name callers (its `sub`, via `jwt_subjects`)."""

    name: str = needed("", check=_issuer_name, doc="shows up in logs and metrics")
    issuer: str = key(
        "", required=True, url=url_problem, check=_issuer_iss, doc="the iss claim, compared exactly"
    )
    jwks_url: str = key(
        "", doc="empty: OIDC discovery at {issuer}/.well-known/openid-configuration"
    )
    audiences: tuple[str, ...] = key(
        (),
        required=True,
        nonempty="must list at least one audience",
        doc="the aud claim must hold one of these",
    )
    ca_file: str = key("", doc="PEM bundle that signs the JWKS endpoint's certificate")
    token_file: str = key(
        "", doc="a bearer token for the discovery and JWKS requests, re-read for each"
    )
    refresh_interval_s: float = key(
        300.0, lo=1, hi=86400, unit="s", doc="how often the JWKS is fetched again"
    )
    min_refresh_interval_s: float = key(
        5.0, lo=0.01, hi=3600, unit="s", doc="an unknown kid fetches the JWKS at most this often"
    )
    timeout_s: float = key(5.0, lo=0.01, hi=300, unit="s", doc="one discovery or JWKS request")
    leeway_s: float = key(30.0, lo=0, hi=600, unit="s", doc="clock skew allowed on exp, nbf, iat")


def _caller_subjects(subjects: tuple[str, ...], t: _Table) -> None:
    _unique_across_callers(subjects, t, "jwt_subjects", "subject")


def _caller_uris(uris: tuple[str, ...], t: _Table) -> None:
    _unique_across_callers(uris, t, "certificate_uris", "URI")


def _unique_across_callers(values: tuple[str, ...], t: _Table, key_: str, what: str) -> None:
    owners: dict[str, str] = {}
    for caller in t.earlier:
        for value in getattr(caller, key_):
            owners.setdefault(value, caller.name)
    for i, value in enumerate(values):
        if value in owners:
            t.problem(f"{key_}[{i}]", f"this {what} is also one of {owners[value]!r}")
        owners.setdefault(value, t.values["name"])


def _nonblank(value: str) -> bool:
    return bool(value) and value == value.strip() and value.isprintable()


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str = needed("", check=_caller_name)
    key_sha256: tuple[str, ...] = key(
        (),
        items=_HEX64.fullmatch,
        item_problem=_DIGEST_PROBLEM,
        check=_caller_digests,
        doc="optional once jwt_subjects or certificate_uris is set",
    )
    organizations: tuple[str, ...] = key(
        (),
        required=True,
        nonempty="must list at least one organization (or '*')",
        items=_is_organization,
        item_problem="expected '*' or 1 to 64 of A-Z a-z 0-9 _ -",
    )
    rate_per_s: float = key(
        0.0, lo=0, hi=1_000_000, unit="per second", doc="this caller's request rate; 0: unlimited"
    )
    burst: int = key(
        0, lo=0, hi=1_000_000, unit="requests", doc="bucket size; 0: twice the rate, at least 1"
    )
    jwt_subjects: tuple[str, ...] = key(
        (),
        items=_nonblank,
        item_problem="expected a non-empty string without surrounding spaces",
        check=_caller_subjects,
        doc="`sub` of a verified JWT from one of the [[issuers]]",
    )
    certificate_uris: tuple[str, ...] = key(
        (),
        items=_nonblank,
        item_problem="expected a non-empty string without surrounding spaces",
        check=_caller_uris,
        doc="URI SAN (a SPIFFE id) of a verified client certificate",
    )


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """`[shared]`: the fleet level on Redis. Its budget is `upstream.fleet_*`."""

    redis_url: str = key(
        "",
        required=True,
        url=_redis_url_problem,
        doc="redis:// or rediss:// (TLS); with cluster, any node; with sentinels, the "
        "scheme and database only (the host is the primary Sentinel names)",
    )
    cluster: bool = key(False, doc="Redis Cluster or Valkey cluster mode")
    sentinels: tuple[str, ...] = key(
        (),
        items=_is_host_port,
        item_problem="expected host:port",
        doc="host:port of each Sentinel; set: the primary is found (and followed) through them",
    )
    sentinel_service: str = key("mymaster", doc="the service (master) name the sentinels watch")
    sentinel_username: str = key("", doc="the sentinels' ACL user (needs sentinel_password_file)")
    sentinel_password_file: str = key(
        "", doc="holds the sentinels' own password (requirepass), re-read for each connection"
    )
    username: str = key("", doc="Redis ACL user; empty: the default user")
    password_file: str = key("", doc="holds the password, re-read for each new connection")
    ca_file: str = key("", doc="PEM bundle to verify a rediss:// server's certificate")
    namespace: str = key("invoice-proxy", doc="key prefix: several deployments can share a Redis")
    timeout_s: float = key(
        0.05, lo=0.001, hi=10, unit="s", doc="one Redis command, connecting included"
    )
    max_connections: int = key(32, lo=1, hi=10_000, doc="connection pool of each process")
    retry_interval_s: float = key(
        1.0, lo=0.01, hi=600, unit="s", doc="after an outage is seen, one probe this often"
    )
    lock_ttl_s: float = key(
        5.0, lo=0.01, hi=600, unit="s", doc="a replica's claim on a fetch; others wait at most this"
    )
    final_ttl_s: float = key(
        2592000.0, lo=0, hi=86400 * 3650, unit="s", doc="final invoices in Redis (30 days); 0: none"
    )


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    credential: CredentialConfig = field(default_factory=CredentialConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    callers: tuple[CallerConfig, ...] = key((), doc="[[callers]]: one table per calling service")
    issuers: tuple[IssuerConfig, ...] = key(
        (), doc="[[issuers]]: JWT issuers trusted to name callers"
    )
    shared: SharedConfig | None = None  # [shared]: the fleet level on Redis; None: off


# --- the reader ------------------------------------------------------------------------


class _Table:
    """A TOML table being read: typed getters that record problems under a dotted path.

    `values` holds its keys read so far; `outer` those of the enclosing table, and
    `earlier` the tables before this one in an array (rules and checks may need them).
    """

    def __init__(
        self,
        data: dict[str, Any],
        path: str,
        problems: list[str],
        *,
        outer: Mapping[str, Any],
        earlier: tuple[Any, ...] = (),
        in_use: bool = True,
    ) -> None:
        self._data = data
        self._path = path
        self.problems = problems
        self.outer = outer
        self.earlier = earlier
        self.in_use = in_use
        self.values: dict[str, Any] = {}
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self._key(key)}: {message}")

    def _get(self, key: str, default: T, kind: str, accept: Callable[[Any], bool]) -> T:
        self._seen.add(key)
        if key not in self._data:
            return default
        value = self._data[key]
        if not accept(value):
            self.problem(key, f"expected {kind}")
            return default
        return value  # type: ignore[no-any-return]

    def required(self, key: str) -> None:
        if key not in self._data:
            self._seen.add(key)
            self.problem(key, "is required")

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default, "a string", lambda v: isinstance(v, str))
        if choices and value not in choices:
            self.problem(key, f"expected one of {', '.join(repr(c) for c in choices)}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, default, "a boolean", lambda v: isinstance(v, bool))

    def integer(self, key: str, default: int, lo: float | None, hi: float | None) -> int:
        value = self._get(
            key, default, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
        )
        return self._range(key, value, default, lo, hi)

    def number(self, key: str, default: float, lo: float | None, hi: float | None) -> float:
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

    def strings(self, key: str, default: tuple[str, ...], spec: Key) -> tuple[str, ...]:
        value = self._get(
            key,
            None,
            "an array of strings",
            lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
        )
        strings = default if value is None else tuple(value)
        if spec.nonempty and not strings and isinstance(self._data.get(key), list):
            self.problem(key, spec.nonempty)
        if spec.items is not None:
            for i, item in enumerate(strings):
                if not spec.items(item):
                    self.problem(f"{key}[{i}]", spec.item_problem)
        return strings

    def table(self, key: str, *, in_use: bool) -> _Table:
        self._seen.add(key)
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "expected a table")
            value = {}
        return _Table(value, self._key(key), self.problems, outer=self.values, in_use=in_use)

    def array(self, key: str) -> list[dict[str, Any]]:
        self._seen.add(key)
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, "expected an array of tables ([[...]])")
            return []
        return value

    def entry(self, key: str, i: int, data: dict[str, Any], earlier: tuple[Any, ...]) -> _Table:
        path = f"{self._key(key)}[{i}]"
        return _Table(data, path, self.problems, outer=self.values, earlier=earlier)

    def finish(self) -> None:
        for key in self._data:
            if key not in self._seen:
                self.problem(key, "unknown key")


@functools.cache
def _types(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _spec(f: dataclasses.Field[Any]) -> Key:
    spec = f.metadata.get(_KEY, _PLAIN)
    assert isinstance(spec, Key)
    return spec


def _read(cls: type[T], t: _Table) -> T:
    """One table as `cls`: every field by its annotation and Key, then the table's URL
    checks and rules (when it is in use), then its unknown keys."""
    section: Any = cls  # a dataclass: mypy cannot say so of a type[T]
    fields = dataclasses.fields(section)
    types_ = _types(section)
    for f in fields:
        t.values[f.name] = _value(f, types_[f.name], t)
    config = cls(**t.values)
    if t.in_use:
        for f in fields:
            spec = _spec(f)
            value = t.values[f.name]
            if spec.url is not None and (value or not spec.required):
                problem = spec.url(value)
                if problem:
                    t.problem(f.name, problem)
        rule = _RULES.get(cls)
        if rule is not None:
            rule(config, t)
    t.finish()
    return config


def _value(f: dataclasses.Field[Any], kind: Any, t: _Table) -> Any:
    """One key of `t`, as the field `f` of type `kind` declares it."""
    spec, name = _spec(f), f.name
    if spec.required and t.in_use:
        t.required(name)
    default: Any = spec.fallback if f.default is dataclasses.MISSING else f.default
    value: Any
    if kind is str:
        value = t.string(name, default, spec.choices)
        if spec.tidy is not None:
            value = spec.tidy(value)
    elif kind is bool:
        value = t.boolean(name, default)
    elif kind is int:
        value = t.integer(name, default, spec.lo, spec.hi)
    elif kind is float:
        value = t.number(name, default, spec.lo, spec.hi)
    elif kind == tuple[str, ...]:
        value = t.strings(name, default, spec)
    elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
        used = spec.used_when is None or t.values[spec.used_when[0]] == spec.used_when[1]
        value = _read(kind, t.table(name, in_use=t.in_use and used))
    elif get_origin(kind) is tuple:  # tuple[SomeConfig, ...]: an array of tables
        entries: tuple[Any, ...] = ()
        for i, data in enumerate(t.array(name)):
            entries += (_read(get_args(kind)[0], t.entry(name, i, data, entries)),)
        value = entries
    elif get_origin(kind) in (Union, types.UnionType):  # SomeConfig | None: optional table
        (table_kind,) = (k for k in get_args(kind) if k is not type(None))
        value = _read(table_kind, t.table(name, in_use=t.in_use)) if t.has(name) else None
    else:
        raise TypeError(f"{name}: no reader for {kind!r}")
    if spec.check is not None:
        spec.check(value, t)
    return value


# --- rules between keys, run after a table's keys are read -----------------------------


def _server_rules(c: ServerConfig, t: _Table) -> None:
    if c.workers > 1:
        if c.port == 0 or c.admin_port == 0:
            t.problem("workers", "needs fixed ports (server.port and server.admin_port not 0)")
        elif c.admin_port <= c.port < c.admin_port + c.workers:
            t.problem("port", f"must not be a worker's admin port ({c.admin_port} and up)")
        elif c.admin_port + c.workers - 1 > 65535:
            t.problem("workers", "worker admin ports (admin_port + i) go beyond 65535")
    if c.port == c.admin_port and c.port != 0:
        t.problem("admin_port", "must differ from server.port")


def _vault_rules(c: VaultConfig, t: _Table) -> None:
    if c.auth == "approle":
        if not c.role_id:
            t.problem("role_id", "is required when auth = 'approle'")
        if not c.secret_id_file:
            t.problem("secret_id_file", "is required when auth = 'approle'")
    if c.auth == "kubernetes" and not c.role:
        t.problem("role", "is required when auth = 'kubernetes'")


def _credential_rules(c: CredentialConfig, t: _Table) -> None:
    if c.source == "vault":
        places = {"vault.path": c.vault.path}
        placeholder = ORGANIZATION_PLACEHOLDER
    elif c.source == "file":
        places = {"file.path": c.file.path}
        placeholder = ORGANIZATION_PLACEHOLDER
    else:
        places = {"env.token_id_var": c.env.token_id_var, "env.token_var": c.env.token_var}
        placeholder = ORGANIZATION_VAR_PLACEHOLDER
    for name, value in places.items():
        has = placeholder in value
        if c.per_organization and not has:
            t.problem(name, f"must hold {placeholder} when per_organization = true")
        elif not c.per_organization and (has or ORGANIZATION_PLACEHOLDER in value):
            t.problem(name, "holds an organization placeholder: set per_organization = true")


def _shared_rules(c: SharedConfig, t: _Table) -> None:
    if c.redis_url and c.ca_file and not c.redis_url.lower().startswith("rediss://"):
        t.problem("ca_file", "is only used with a rediss:// URL")
    if c.username and not c.password_file:
        t.problem("username", "needs shared.password_file")
    if not _NAMESPACE.fullmatch(c.namespace):
        t.problem("namespace", "expected 1 to 64 characters of A-Z a-z 0-9 _ . -")
    if c.cluster and c.sentinels:
        t.problem("sentinels", "cannot be used with cluster = true (a cluster has no Sentinel)")
    if c.cluster and re.search(r"^[^?]*//[^/?]*/0*[1-9]", c.redis_url):
        t.problem("redis_url", "a cluster has database 0 only")
    if c.sentinel_username and not c.sentinel_password_file:
        t.problem("sentinel_username", "needs shared.sentinel_password_file")
    if not c.sentinels and (c.sentinel_username or c.sentinel_password_file):
        t.problem("sentinel_password_file", "is only used with shared.sentinels")


def _caller_rules(c: CallerConfig, t: _Table) -> None:
    if not (c.key_sha256 or c.jwt_subjects or c.certificate_uris):
        t.problem(
            "key_sha256",
            "the caller has no way to authenticate: list a digest, a jwt_subjects or a "
            "certificate_uris entry",
        )


def _issuer_rules(c: IssuerConfig, t: _Table) -> None:
    if c.jwks_url:
        problem = url_problem(c.jwks_url, query=True)
        if problem:
            t.problem("jwks_url", problem)


def _tls_rules(c: TlsConfig, t: _Table) -> None:
    for name in ("cert_file", "key_file"):
        if t.has(name) and not getattr(c, name):
            t.problem(name, "must name a file")


def _config_rules(c: Config, t: _Table) -> None:
    if not c.callers and not t.problems:
        t.problem("callers", "at least one [[callers]] table is required")
    for i, caller in enumerate(c.callers):
        if caller.jwt_subjects and not c.issuers:
            t.problem(f"callers[{i}].jwt_subjects", "needs at least one [[issuers]] table")
        if caller.certificate_uris and (c.server.tls is None or not c.server.tls.client_ca_file):
            t.problem(f"callers[{i}].certificate_uris", "needs server.tls.client_ca_file")


# By section: run once the section's keys are read, if the section is in use.
_RULES: dict[type, Callable[[Any, _Table], None]] = {
    ServerConfig: _server_rules,
    VaultConfig: _vault_rules,
    CredentialConfig: _credential_rules,
    SharedConfig: _shared_rules,
    CallerConfig: _caller_rules,
    IssuerConfig: _issuer_rules,
    TlsConfig: _tls_rules,
    Config: _config_rules,
}


def parse_section(
    cls: type[T], data: dict[str, Any], path: str = "", **outer: Any
) -> tuple[T, list[str]]:
    """Read one table as the section dataclass `cls`: the section, and every problem
    named by its path under `path` (none: it is valid).

    `outer` holds keys of the enclosing table its rules read (for `SharedConfig`,
    `upstream`: an UpstreamConfig, whose defaults apply otherwise).
    """
    problems: list[str] = []
    section = _read(cls, _Table(data, path, problems, outer=outer))
    return section, problems


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from a decoded TOML document; raise ConfigError with every problem."""
    config, problems = parse_section(Config, data)
    if problems:
        raise ConfigError(problems)
    return config


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
