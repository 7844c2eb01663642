"""JWT callers: the issuers' published keys (JWKS) and the verification of a token.

A token is verified with PyJWT (and `cryptography`), never with crypto of our own:
- the header's `alg` must be one of `ALGORITHMS`, asymmetric only: never `none`, never
  HMAC (an HS256 token "signed" with an issuer's public key is refused before any key
  is looked at);
- the key is the issuer's JWK named by `kid`, and its `kty` (and `crv`, and `alg` when
  the JWK states one) must agree with the header's `alg`;
- `iss` exact, `aud` one of the issuer's `audiences`, `exp` required, `nbf` and `iat`
  within `leeway_s`, and a `sub` (it names the caller).

`JwksKeys` keeps one issuer's keys: fetched at start-up and every
`refresh_interval_s` by a supervised task (OIDC discovery, or `jwks_url`), and again
when a token names a `kid` it does not know, at most once every
`min_refresh_interval_s`, so a flood of forged `kid`s costs the issuer one request
every few seconds. When the issuer cannot be reached, the keys in hand keep working.

Nothing here logs or raises a token: a refusal is a `Refused` with a fixed reason.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import structlog

from .config import IssuerConfig
from .metrics import Metrics
from .tasks import Backoff, Sleep, start, stop, supervise

log = structlog.get_logger("proxy.jwt")

# The allow-list: asymmetric signatures only. The JWK key type (and curve) each needs.
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
_MAX_DOCUMENT_BYTES = 1024 * 1024  # a discovery document or a JWKS is a few KiB
_MAX_TOKEN_CHARS = 16 * 1024


class Refused(Exception):
    """A token that names no caller. `reason` is a fixed word (a metric label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


REFUSAL_REASONS = (
    "malformed",
    "algorithm",
    "unknown_issuer",
    "unknown_key",
    "key_mismatch",
    "signature",
    "expired",
    "not_yet_valid",
    "audience",
    "claims",
)


class JwksError(Exception):
    """A discovery or JWKS fetch that failed; its message is safe to log (no body)."""


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified token says: its subject, its issuer's name, when it expires."""

    subject: str
    issuer: str
    expires: float


class JwksKeys:
    """One issuer's signing keys, kept current; `key_for(kid, alg)` is what tokens use."""

    def __init__(
        self,
        config: IssuerConfig,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._session = session
        self._metrics = metrics
        self._monotonic = monotonic
        self._jwks: dict[str, dict[str, Any]] = {}  # kid -> the JWK as published
        self._keys: dict[tuple[str, str], jwt.PyJWK] = {}  # (kid, alg) -> a usable key
        self._lock = asyncio.Lock()
        self._fetches = 0
        self._last_attempt = -float("inf")
        self._failures = 0  # fetches failed in a row (the task's next try backs off)
        self.loaded = False
        self.on_keys_removed: Callable[[], None] = lambda: None
        for result in ("ok", "failed"):
            metrics.jwks_refreshes.labels(issuer=config.name, result=result)

    @property
    def kids(self) -> list[str]:
        return sorted(self._jwks)

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for a token's header; an unknown kid fetches the JWKS (rate-limited)."""
        jwk = self._find(kid)
        if jwk is None and (
            self._lock.locked()
            or self._monotonic() - self._last_attempt >= self.config.min_refresh_interval_s
        ):
            await self.refresh("unknown_kid")
            jwk = self._find(kid)
        if jwk is None:
            raise Refused("unknown_key")
        return self._usable(jwk, alg)

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:
            # A token without kid: only an issuer with a single key is unambiguous.
            return next(iter(self._jwks.values())) if len(self._jwks) == 1 else None
        return self._jwks.get(kid)

    def _usable(self, jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
        kty, crv = ALGORITHMS[alg]
        if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
            raise Refused("key_mismatch")
        if "alg" in jwk and jwk["alg"] != alg:
            raise Refused("key_mismatch")
        if alg == "EdDSA" and jwk.get("crv") not in ("Ed25519", "Ed448"):
            raise Refused("key_mismatch")
        cache_key = (str(jwk.get("kid", "")), alg)
        key = self._keys.get(cache_key)
        if key is None:
            try:
                key = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                raise Refused("key_mismatch") from None
            self._keys[cache_key] = key
        return key

    async def refresh(self, why: str) -> bool:
        """Fetch the JWKS once (a fetch under way is joined); False when it failed."""
        seen = self._fetches
        async with self._lock:
            if self._fetches != seen:
                return True  # another caller's fetch finished while this one waited
            self._last_attempt = self._monotonic()
            try:
                jwks = await self._fetch()
            except JwksError as exc:
                self._metrics.jwks_refreshes.labels(issuer=self.config.name, result="failed").inc()
                log.warning(
                    "jwks_refresh_failed",
                    issuer=self.config.name,
                    reason=str(exc),
                    why=why,
                    keeping=len(self._jwks),
                )
                return False
            finally:
                self._fetches += 1
            removed = set(self._jwks) - set(jwks)
            changed = jwks != self._jwks
            self._jwks = jwks
            if changed:
                self._keys = {}
            self.loaded = True
            self._metrics.jwks_refreshes.labels(issuer=self.config.name, result="ok").inc()
            self._metrics.jwks_keys.labels(issuer=self.config.name).set(len(jwks))
            if changed:
                log.info("jwks_loaded", issuer=self.config.name, kids=sorted(jwks), why=why)
            if removed:
                self.on_keys_removed()  # tokens verified with a withdrawn key: forgotten
            return True

    async def _fetch(self) -> dict[str, dict[str, Any]]:
        url = self.config.jwks_url
        if not url:
            discovery = await self._get_json(
                self.config.issuer + "/.well-known/openid-configuration", "discovery"
            )
            if discovery.get("issuer") != self.config.issuer:
                raise JwksError("the discovery document names another issuer")
            found = discovery.get("jwks_uri")
            if not isinstance(found, str) or not found.startswith(("https://", "http://")):
                raise JwksError("the discovery document has no jwks_uri")
            url = found
        document = await self._get_json(url, "JWKS")
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise JwksError("the JWKS has no keys array")
        return _signing_keys(keys)

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if self.config.token_file:
            headers["Authorization"] = f"Bearer {_read_token(self.config.token_file)}"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self._session().get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise JwksError(f"the {what} request answered HTTP {response.status}")
                body = await response.content.read(_MAX_DOCUMENT_BYTES + 1)
        except aiohttp.ClientError as exc:
            raise JwksError(f"the {what} request failed ({type(exc).__name__})") from None
        except TimeoutError:
            raise JwksError(f"the {what} request timed out") from None
        if len(body) > _MAX_DOCUMENT_BYTES:
            raise JwksError(f"the {what} document is too large")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise JwksError(f"the {what} document is not JSON") from None
        if not isinstance(document, dict):
            raise JwksError(f"the {what} document is not a JSON object")
        return document

    async def run(self, sleep: Sleep) -> None:
        """One round of the supervised task: fetch, then wait for the next round."""
        ok = await self.refresh("periodic")
        self._failures = 0 if ok else self._failures + 1
        if ok:
            await sleep(self.config.refresh_interval_s)
        else:
            retry = Backoff(self.config.min_refresh_interval_s, self.config.refresh_interval_s)
            await sleep(retry.delay(self._failures))


def _read_token(path: str) -> str:
    """The bearer token for the JWKS endpoint (a projected token: small, local, re-read)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(64 * 1024).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise JwksError(f"token_file cannot be read ({type(exc).__name__})") from None


def _signing_keys(keys: list[Any]) -> dict[str, dict[str, Any]]:
    """The JWKS's signing keys by kid; keys for encryption, or of no known type, are left."""
    found: dict[str, dict[str, Any]] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("kty") not in ("RSA", "EC", "OKP") or "d" in jwk:
            continue  # a private key published by mistake is not used either
        kid = jwk.get("kid", "")
        if isinstance(kid, str) and kid not in found:
            found[kid] = jwk
    return found


class JwtVerifier:
    """Verifies a token against the issuer its `iss` names."""

    def __init__(self, issuers: Iterable[JwksKeys], clock: Callable[[], float] = time.time):
        self._issuers = {keys.config.issuer: keys for keys in issuers}
        self._clock = clock

    @property
    def issuers(self) -> list[JwksKeys]:
        return list(self._issuers.values())

    async def verify(self, token: str) -> Verified:
        if len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2:
            raise Refused("malformed")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Refused("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise Refused("algorithm")
        iss = claims.get("iss")
        keys = self._issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise Refused("unknown_issuer")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Refused("malformed")
        key = await keys.key_for(kid, alg)
        config = keys.config
        try:
            verified = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(config.audiences),
                issuer=config.issuer,
                leeway=config.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused("expired") from None
        except jwt.ImmatureSignatureError:
            raise Refused("not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise Refused("audience") from None
        except jwt.InvalidSignatureError:
            raise Refused("signature") from None
        except jwt.PyJWTError:
            raise Refused("claims") from None
        subject, expires = verified.get("sub"), verified.get("exp")
        if not isinstance(subject, str) or not subject or not isinstance(expires, int | float):
            raise Refused("claims")
        return Verified(subject, config.name, float(expires))


def ssl_context(ca_file: str) -> ssl.SSLContext | bool:
    """The TLS verification of a JWKS endpoint: the system's roots, or `ca_file`'s."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def open_session(config: IssuerConfig) -> aiohttp.ClientSession:
    """The client of one issuer's discovery and JWKS endpoints (its own CA, if set)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context(config.ca_file), limit=4)
    return aiohttp.ClientSession(connector=connector, trust_env=False)


class JwksRefreshers:
    """The supervised tasks that keep every issuer's keys current (one task each)."""

    def __init__(self, issuers: Iterable[JwksKeys], metrics: Metrics, sleep: Sleep) -> None:
        self._issuers = list(issuers)
        self._metrics = metrics
        self._sleep = sleep
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        for keys in self._issuers:
            work = supervise(
                "jwks_refresher",
                lambda keys=keys: keys.run(self._sleep),  # type: ignore[misc]
                self._metrics,
                sleep=self._sleep,
                safe_errors=(JwksError,),
            )
            self._tasks.append(start(f"jwks_refresher:{keys.config.name}", work))

    async def stop(self) -> None:
        for task in self._tasks:
            await stop(task)
        self._tasks.clear()
