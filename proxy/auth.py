"""Caller keys -> `Caller`: digest comparison, organization allow-list, per-caller rate.

Callers send `Authorization: Bearer <key>`. The proxy only knows SHA-256 digests of
keys. The digest of the presented key finds its candidate in a dict (that reveals
nothing about a key: finding a key from its digest is infeasible) and is then
compared with `hmac.compare_digest`. Several digests per caller let a key rotate.

A bearer value that is no known key may be a JWT (`jwt_auth.py` verifies it, and its
`sub` names the caller through `jwt_subjects`); a verified token is remembered by the
same SHA-256 digest until its `exp`, so a repeated caller costs a dict lookup. Without
an Authorization header, a client certificate that verified against
`server.tls.client_ca_file` names the caller by a URI SAN in `certificate_uris`.
A header that is present decides alone: a refused key never falls back to a certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from . import errors
from .config import CallerConfig
from .jwt_auth import REFUSAL_REASONS, JwtVerifier, Refused
from .metrics import Metrics
from .resilience import TokenBucket
from .tls import certificate_uris

# How a caller authenticated: the `auth` field of the request's log line.
KEY, JWT, CERTIFICATE = "key", "jwt", "certificate"
REMEMBERED_TOKENS = 10_000  # verified JWTs kept (LRU): a few MiB at most

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

    def may_read(self, organization: str) -> bool:
        return self.all_organizations or organization in self.organizations

    def authorize(self, organization: str) -> None:
        if not self.may_read(organization):
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


class KnownKey:
    """A connection's last caller key or JWT and what `Authenticator.known_on` found.

    A client's requests on one connection bear the same `Authorization`, as a rule. It
    is kept with the caller list it was found in and, for a JWT, the remembered tokens
    it was found among and its `exp` (a JWT the remembered tokens let go for room is
    still this connection's until then). A certificate's caller takes no digest to find.
    """

    __slots__ = ("authorization", "callers", "expires", "found", "tokens")

    def __init__(self) -> None:
        self.authorization: str | None = None
        self.callers: object = None  # the `_by_digest` it was found in
        self.tokens: object = None  # the `_remembered` of that time (`forget_tokens`)
        self.expires = math.inf  # a JWT's exp
        self.found: tuple[Caller, str] | None = None


class Authenticator:
    """Finds the caller for an `Authorization` header (a key or a JWT) or a client
    certificate; its caller list can be replaced live."""

    def __init__(
        self,
        callers: Iterable[CallerConfig],
        metrics: Metrics | None = None,
        tokens: JwtVerifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._tokens = tokens
        self._clock = clock
        self._by_digest: dict[bytes, tuple[bytes, Caller]] = {}
        self._by_subject: dict[str, Caller] = {}
        self._by_uri: dict[str, Caller] = {}
        # A verified JWT's digest -> (its exp, its caller); oldest use first.
        self._remembered: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()
        if metrics is not None and tokens is not None:
            for reason in (*REFUSAL_REASONS, "unknown_subject"):
                metrics.jwt_refusals.labels(reason=reason)
        self.replace(callers)

    def replace(self, callers: Iterable[CallerConfig]) -> None:
        """Swap in a new caller list (SIGHUP). Existing rate buckets start afresh, and
        remembered JWTs are verified again."""
        by_digest, by_subject, by_uri = {}, {}, {}
        names = set()
        for config in callers:
            caller = Caller(config, self._throttled_counter(config.name))
            names.add(config.name)
            for hex_digest in config.key_sha256:
                digest = bytes.fromhex(hex_digest)
                by_digest[digest] = (digest, caller)
            by_subject.update(dict.fromkeys(config.jwt_subjects, caller))
            by_uri.update(dict.fromkeys(config.certificate_uris, caller))
        self._by_digest, self._by_subject, self._by_uri = by_digest, by_subject, by_uri
        self._names = sorted(names)
        self.forget_tokens()

    def forget_tokens(self) -> None:
        """Drop every remembered JWT (an issuer withdrew a key, the callers changed)."""
        self._remembered = OrderedDict()

    def _throttled_counter(self, name: str) -> Callable[[], None]:
        if self._metrics is None:
            return _nothing
        return self._metrics.caller_throttled.labels(caller=name).inc

    @property
    def names(self) -> list[str]:
        return self._names

    def known_on(
        self, connection: KnownKey, authorization: str | None, peercert: dict[str, Any] | None
    ) -> tuple[Caller, str] | None:
        """The caller named without verifying anything new (a key, a JWT remembered
        until its `exp`, a certificate URI), and how; None: not known this way.

        On a connection whose last request bore the same key or JWT, its caller again
        without its digest, while the caller list and the remembered tokens it was found
        in are the current ones (`replace` and `forget_tokens` make new ones) and a
        JWT's `exp` has not come."""
        if (
            authorization is not None
            and connection.callers is self._by_digest
            and connection.tokens is self._remembered
            and connection.authorization is not None
            and hmac.compare_digest(authorization, connection.authorization)
            and (connection.expires == math.inf or connection.expires > self._clock())
        ):
            return connection.found
        if authorization is None:
            return self._by_certificate(peercert)
        key = _bearer(authorization)
        if not key:
            return None
        digest = _digest(key)
        found = self._by_digest_of(digest)
        if found is not None:
            connection.authorization = authorization
            connection.callers = self._by_digest
            connection.tokens = self._remembered
            connection.expires = math.inf if found[1] == KEY else self._remembered[digest][0]
            connection.found = found
        return found

    async def authenticate(
        self, authorization: str | None, peercert: dict[str, Any] | None = None
    ) -> tuple[Caller, str]:
        """The caller, and how it authenticated (`KEY`, `JWT`, `CERTIFICATE`); else 401."""
        if authorization is None:
            found = self._by_certificate(peercert)
        else:
            key = _bearer(authorization)
            if not key:
                raise errors.unauthorized()
            digest = _digest(key)
            found = self._by_digest_of(digest)
            if found is None and self._tokens is not None:
                return await self._verify(key, digest), JWT
        if found is None:
            raise errors.unauthorized()
        return found

    def _by_certificate(self, peercert: dict[str, Any] | None) -> tuple[Caller, str] | None:
        for uri in certificate_uris(peercert):
            caller = self._by_uri.get(uri)
            if caller is not None:
                return caller, CERTIFICATE
        return None

    def _by_digest_of(self, digest: bytes) -> tuple[Caller, str] | None:
        """A key's caller, or a JWT's remembered until its `exp`, by the bearer's digest."""
        found = self._by_digest.get(digest)
        if found is not None and hmac.compare_digest(found[0], digest):
            return found[1], KEY
        remembered = self._remembered.get(digest)
        if remembered is not None:
            if remembered[0] > self._clock():
                self._remembered.move_to_end(digest)
                return remembered[1], JWT
            del self._remembered[digest]
        return None

    async def _verify(self, token: str, digest: bytes) -> Caller:
        assert self._tokens is not None
        try:
            verified = await self._tokens.verify(token)
        except Refused as refused:
            self._refused(refused.reason)
            raise errors.unauthorized() from None
        caller = self._by_subject.get(verified.subject)
        if caller is None:
            self._refused("unknown_subject")
            raise errors.unauthorized()
        remembered = self._remembered
        remembered[digest] = (verified.expires, caller)
        if len(remembered) > REMEMBERED_TOKENS:
            remembered.popitem(last=False)
        return caller

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.jwt_refusals.labels(reason=reason).inc()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _bearer(authorization: str) -> str:
    """The credential of `Bearer <credential>`; "" for any other scheme or none."""
    if authorization[:7].lower() != "bearer ":
        return ""
    return authorization[7:].strip()


def new_caller_key() -> tuple[str, str]:
    """A fresh random caller key (256 bits) and its SHA-256 hex digest."""
    key = secrets.token_urlsafe(32)
    return key, key_digest(key)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
