"""Caller keys -> `Caller`: digest comparison, organization allow-list, per-caller rate.

Callers send `Authorization: Bearer <key>`. The proxy only knows SHA-256 digests of
keys. The digest of the presented key finds its candidate in a dict (that reveals
nothing about a key: finding a key from its digest is infeasible) and is then
compared with `hmac.compare_digest`. Several digests per caller let a key rotate.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable

from . import errors
from .config import CallerConfig
from .metrics import Metrics
from .resilience import TokenBucket

ALL = "*"


def _nothing() -> None:
    return None


class Caller:
    """An authenticated internal service."""

    __slots__ = ("_on_throttled", "all_organizations", "bucket", "name", "organizations")

    def __init__(self, config: CallerConfig, on_throttled: Callable[[], None] = _nothing) -> None:
        self.name = config.name
        self._on_throttled = on_throttled
        self.organizations = frozenset(config.organizations)
        self.all_organizations = ALL in self.organizations
        self.bucket = (
            TokenBucket(config.rate_per_s, config.burst or max(1, int(config.rate_per_s * 2)))
            if config.rate_per_s > 0
            else None
        )

    def authorize(self, organization: str) -> None:
        if not (self.all_organizations or organization in self.organizations):
            raise errors.forbidden(organization)

    def take_rate_token(self) -> None:
        """Raise 429 when this caller is over its own rate."""
        if self.bucket is not None:
            wait = self.bucket.try_take()
            if wait:
                self._on_throttled()
                raise errors.rate_limited(
                    wait, "this caller is over its request rate; retry after the given delay"
                )


class Authenticator:
    """Finds the caller for an `Authorization` header; its caller list can be replaced live."""

    def __init__(self, callers: Iterable[CallerConfig], metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._by_digest: dict[bytes, tuple[bytes, Caller]] = {}
        self.replace(callers)

    def replace(self, callers: Iterable[CallerConfig]) -> None:
        """Swap in a new caller list (SIGHUP). Existing rate buckets start afresh."""
        by_digest = {}
        for config in callers:
            caller = Caller(config, self._throttled_counter(config.name))
            for hex_digest in config.key_sha256:
                digest = bytes.fromhex(hex_digest)
                by_digest[digest] = (digest, caller)
        self._by_digest = by_digest

    def _throttled_counter(self, name: str) -> Callable[[], None]:
        if self._metrics is None:
            return _nothing
        return self._metrics.caller_throttled.labels(caller=name).inc

    @property
    def names(self) -> list[str]:
        return sorted({caller.name for _, caller in self._by_digest.values()})

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization or authorization[:7].lower() != "bearer ":
            raise errors.unauthorized()
        key = authorization[7:].strip()
        if not key:
            raise errors.unauthorized()
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise errors.unauthorized()
        return found[1]


def new_caller_key() -> tuple[str, str]:
    """A fresh random caller key (256 bits) and its SHA-256 hex digest."""
    key = secrets.token_urlsafe(32)
    return key, key_digest(key)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
