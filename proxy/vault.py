"""The PlanetScale token from HashiCorp Vault or OpenBao (KV version 2).

`VaultSource` reads `{address}/v1/{mount}/data/{path}` and turns the secret's fields
into a `Credential` that carries the KV version. Its `VaultClient` logs in to Vault (a
token from a file or the environment, AppRole, or Kubernetes), renews the login token
before its lease runs out, and logs in again when renewal fails or a read is refused;
with one token per organization, one client (one login) serves every organization's
`VaultSource`.

Vault tokens, secret_ids and JWTs are held in `_Secret` wrappers whose repr is
redacted, and are unwrapped only inside the call that sends them. Every failure
becomes a `CredentialError` whose message is safe to log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from .config import VaultConfig
from .credential import MAX_VERSION, Credential, CredentialError, credential_from_fields

log = structlog.get_logger("proxy.vault")

# A login token is renewed once this share of its lease has passed, so a renewal
# that fails still leaves a third of the lease to log in again.
RENEW_AT = 2 / 3
# Vault answers with a few hundred bytes; anything near this is not Vault.
_MAX_BODY_BYTES = 1024 * 1024
# A token, secret_id or service-account JWT file; a JWT is a few kilobytes.
_MAX_SECRET_FILE_BYTES = 64 * 1024
# Vault's own error text goes into reasons; a long one is cut.
_MAX_REASON_CHARS = 200
_MAX_ERRORS = 5
# A lease longer than this (ten years) is not a Vault answer; it would also overflow
# the clock arithmetic of a renewal.
_MAX_LEASE_S = 10 * 365 * 24 * 3600
# A Vault token is a few hundred characters at most (a batch token is the longest).
_MAX_TOKEN_CHARS = 4096
_MULTIERROR_HEADER = re.compile(r"^\s*\d+ errors? occurred:")
_MULTIERROR_ITEM = re.compile(r"\n\s*\*\s+")


class _Secret:
    """A string that never shows itself in a repr, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass(slots=True)
class _Login:
    """A Vault token from a login, and when it must be renewed."""

    token: _Secret
    lease_s: float  # the lease Vault granted; 0: the token does not expire
    renewable: bool
    renew_at: float | None  # clock time to renew or log in again; None: never
    # Set once a renewal granted less than the login did: the token reached its max_ttl,
    # so the next time it is due the source logs in again instead of renewing.
    capped: bool = False


class VaultSource:
    """A `CredentialSource` reading the PlanetScale token from a Vault KV v2 secret.

    By itself it logs in on its own (`VaultClient`); with `client`, it reads `path`
    through that client's login, so one login serves the secrets of every organization.
    """

    name = "vault"

    def __init__(
        self,
        config: VaultConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
        client: VaultClient | None = None,
        path: str | None = None,
    ) -> None:
        self._owns_client = client is None
        self._environ = os.environ if environ is None else environ
        self._client = client or VaultClient(config, clock=clock, environ=self._environ)
        self.poll_interval_s = config.refresh_interval_s
        self.path = config.path if path is None else path
        self._auth = config.auth
        self._address = config.address

    def __repr__(self) -> str:
        return f"VaultSource(address={self._address!r}, secret={self.path!r}, auth={self._auth!r})"

    async def fetch(self, force: bool) -> Credential:
        """Read the secret now (every poll is a read: KV v2 has no cheaper change check)."""
        return await self._client.read(self.path)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class VaultClient:
    """One Vault login (renewed, logged in again when refused) and the secret reads over it.

    Logins and renewals are serialized (never sent twice at once); reads of different
    secrets go out side by side.
    """

    def __init__(
        self,
        config: VaultConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._environ = os.environ if environ is None else environ
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._login: _Login | None = None
        self._logins = 0  # successful logins so far
        # auth = "token": the token in hand and the stat signature of the file it came from.
        self._static_token: _Secret | None = None
        self._token_file_signature: tuple[int, int, int, int] | None = None

    def __repr__(self) -> str:
        return f"VaultClient(address={self._config.address!r}, auth={self._config.auth!r})"

    async def read(self, path: str) -> Credential:
        """Read the secret at `path` of the mount, with this client's login."""
        c = self._config
        url = f"{c.address}/v1/{c.mount}/data/{path}"
        session = self._ensure_session()
        async with self._lock:
            before = self._logins
            token = await self._token(session)
            fresh = before != self._logins  # logged in for this very read
            logins = self._logins
        status, body = await self._call(session, "GET", url, token)
        if status in (401, 403) and c.auth != "token":
            async with self._lock:
                if self._logins != logins and self._login is not None:
                    # Another read logged in again meanwhile: its token, one retry.
                    token = self._login.token
                    fresh = False
                elif not fresh:
                    # The login token was revoked or expired early: one new login, one
                    # retry. (A token from a login just now is not retried: its policy
                    # is the problem.)
                    token = await self._log_in(session, reason="read_refused")
            if not fresh:
                status, body = await self._call(session, "GET", url, token)
        return self._credential(f"{c.mount}/{path}", status, body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP ---------------------------------------------------------------------

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            c = self._config
            ssl_context: ssl.SSLContext | bool = True
            if c.ca_file:
                try:
                    ssl_context = ssl.create_default_context(cafile=c.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    reason = getattr(exc, "strerror", None) or "not a PEM certificate bundle"
                    raise CredentialError(
                        f"ca_file {c.ca_file} cannot be loaded: {reason}"
                    ) from None
            headers = {"X-Vault-Namespace": c.namespace} if c.namespace else {}
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=c.timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4),
                headers=headers,
            )
        return self._session

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        token: _Secret | None,
        payload: Mapping[str, str | _Secret] | None = None,
        *,
        scrub: tuple[_Secret, ...] = (),
    ) -> tuple[int, dict[str, Any]]:
        """One Vault request: (status, decoded JSON body, {} when there is none)."""
        address = self._config.address
        try:
            async with session.request(
                method,
                url,
                headers=None if token is None else {"X-Vault-Token": token.reveal()},
                json=None
                if payload is None
                else {k: v.reveal() if isinstance(v, _Secret) else v for k, v in payload.items()},
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    raw += chunk
                    if len(raw) > _MAX_BODY_BYTES:
                        raise CredentialError(
                            f"Vault at {address} sent more than {_MAX_BODY_BYTES} bytes"
                        )
        except aiohttp.ClientSSLError:
            raise CredentialError(
                f"TLS connection to Vault at {address} failed (certificate not trusted?)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise CredentialError(f"cannot connect to Vault at {address}: {reason}") from None
        except TimeoutError:
            raise CredentialError(
                f"Vault at {address} did not answer within {self._config.timeout_s:g}s"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # OSError: a socket or TLS error aiohttp did not wrap; ValueError: a header
            # value aiohttp refuses to send. The class says which; a message could
            # quote what was sent.
            raise CredentialError(
                f"request to Vault at {address} failed ({type(exc).__name__})"
            ) from None
        try:
            body = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            # Not JSON, bad UTF-8, an integer too long to convert, or nesting deeper
            # than the parser goes.
            body = None
        if not isinstance(body, dict):
            if status == 200:
                raise CredentialError(f"Vault at {address} answered with a body that is not JSON")
            body = {}
        # Vault's error text (such as "permission denied") never holds a token, but a
        # login error could echo what was sent: cut out every secret of this request.
        errors = body.get("errors")
        if isinstance(errors, list):
            body["errors"] = [
                _scrub(str(e), (token, *scrub)) for e in errors if isinstance(e, str | int)
            ]
        return status, body

    # -- Vault tokens -------------------------------------------------------------

    async def _token(self, session: aiohttp.ClientSession) -> _Secret:
        if self._config.auth == "token":
            return self._read_static_token()
        login = self._login
        if login is None:
            return await self._log_in(session, reason="start")
        if login.renew_at is None or self._clock() < login.renew_at:
            return login.token
        if not login.renewable:
            return await self._log_in(session, reason="not_renewable")
        if login.capped:
            return await self._log_in(session, reason="max_ttl")
        try:
            return await self._renew(session, login)
        except CredentialError as exc:
            log.warning("vault_token_renewal_failed", reason=str(exc))
            return await self._log_in(session, reason="renewal_failed")

    def _read_static_token(self) -> _Secret:
        c = self._config
        if not c.token_file:
            value = self._environ.get(c.token_env, "").strip()
            if not value:
                raise CredentialError(f"environment variable {c.token_env} is not set or empty")
            return _Secret(value)
        signature = _file_signature(c.token_file, "token_file")
        if self._static_token is None or signature != self._token_file_signature:
            self._static_token = _read_secret_file(c.token_file, "token_file")
            self._token_file_signature = signature
            log.info("vault_token_file_loaded", path=c.token_file)
        return self._static_token

    async def _log_in(self, session: aiohttp.ClientSession, reason: str) -> _Secret:
        c = self._config
        payload: dict[str, str | _Secret]
        if c.auth == "approle":
            mount = c.approle_mount
            secret_id = _read_secret_file(c.secret_id_file, "secret_id_file")
            payload = {"role_id": c.role_id, "secret_id": secret_id}
            scrub: tuple[_Secret, ...] = (secret_id,)
        elif c.auth == "kubernetes":
            mount = c.kubernetes_mount
            # Read at each login: Kubernetes rotates a projected service-account token.
            jwt = _read_secret_file(c.jwt_file, "jwt_file")
            payload = {"role": c.role, "jwt": jwt}
            scrub = (jwt,)
        else:
            raise CredentialError(f"auth method {c.auth!r} does not log in")
        url = f"{c.address}/v1/auth/{mount}/login"
        status, body = await self._call(session, "POST", url, None, payload, scrub=scrub)
        what = f"Vault {c.auth} login at auth/{mount}"
        if status != 200:
            raise CredentialError(_http_reason(what, status, body))
        login = self._login_from(body, what)
        self._login = login
        self._logins += 1
        log.info(
            "vault_login",
            auth=c.auth,
            mount=mount,
            reason=reason,
            lease_s=login.lease_s,
            renewable=login.renewable,
        )
        return login.token

    async def _renew(self, session: aiohttp.ClientSession, login: _Login) -> _Secret:
        url = f"{self._config.address}/v1/auth/token/renew-self"
        status, body = await self._call(session, "POST", url, login.token, {})
        if status != 200:
            raise CredentialError(_http_reason("Vault token renewal", status, body))
        renewed = self._login_from(body, "Vault token renewal", token=login.token)
        renewed.capped = renewed.lease_s < login.lease_s
        self._login = renewed
        log.info("vault_token_renewed", lease_s=renewed.lease_s, capped=renewed.capped)
        return renewed.token

    def _login_from(self, body: dict[str, Any], what: str, token: _Secret | None = None) -> _Login:
        auth = body.get("auth")
        if not isinstance(auth, dict):
            raise CredentialError(f"{what}: the answer has no auth block")
        if token is None:
            client_token = auth.get("client_token")
            if not isinstance(client_token, str) or not client_token:
                raise CredentialError(f"{what}: the answer has no client_token")
            if (
                len(client_token) > _MAX_TOKEN_CHARS
                or not client_token.isascii()
                or not client_token.isprintable()
            ):
                # It would go into a header: a control character would break the request.
                raise CredentialError(f"{what}: the answer's client_token is not a token")
            token = _Secret(client_token)
        lease = auth.get("lease_duration")
        if not isinstance(lease, int) or isinstance(lease, bool) or not 0 <= lease <= _MAX_LEASE_S:
            raise CredentialError(f"{what}: the answer has no valid lease_duration")
        renewable = auth.get("renewable") is True
        renew_at = self._clock() + lease * RENEW_AT if lease else None
        return _Login(token, float(lease), renewable, renew_at)

    # -- the secret ---------------------------------------------------------------

    def _credential(self, where: str, status: int, body: dict[str, Any]) -> Credential:
        data = body.get("data")
        metadata = data.get("metadata") if isinstance(data, dict) else None
        version = metadata.get("version") if isinstance(metadata, dict) else None
        if status == 404:
            if isinstance(version, int) and 0 < version <= MAX_VERSION:
                raise CredentialError(f"Vault secret {where}: version {version} is deleted")
            raise CredentialError(f"Vault has no secret at {where} (HTTP 404)")
        if status != 200:
            raise CredentialError(_http_reason(f"Vault read of {where}", status, body))
        if not isinstance(data, dict) or not isinstance(version, int) or isinstance(version, bool):
            raise CredentialError(f"Vault secret {where}: not a KV version 2 answer (no version)")
        if not 0 < version <= MAX_VERSION:
            raise CredentialError(f"Vault secret {where}: the version is out of range")
        fields = data.get("data")
        if fields is None:
            raise CredentialError(f"Vault secret {where}: version {version} is deleted")
        try:
            credential = credential_from_fields(
                fields,
                token_id_field=self._config.token_id_field,
                token_field=self._config.token_field,
                version=version,
            )
        except CredentialError as exc:
            raise CredentialError(f"Vault secret {where} version {version}: {exc}") from None
        log.debug("vault_secret_read", secret=where, version=version)
        return credential


def _http_reason(what: str, status: int, body: dict[str, Any]) -> str:
    errors = body.get("errors")
    # A few errors say what is wrong; thousands would only flood the log line.
    text = "; ".join(errors[:_MAX_ERRORS]) if isinstance(errors, list) else ""
    if 300 <= status < 400:
        # A standby that does not forward requests redirects to the active node. The
        # token is not sent after a redirect, wherever it points.
        text = "redirect not followed: set address to the active node or the load balancer"
    return f"{what} failed: HTTP {status}" + (f" ({text})" if text else "")


def _scrub(text: str, secrets: tuple[_Secret | None, ...]) -> str:
    for secret in secrets:
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), "<redacted>")
    # Go's multierror: "1 error occurred:\n\t* permission denied\n\n".
    parts = _MULTIERROR_ITEM.split(_MULTIERROR_HEADER.sub("", text))
    text = "; ".join(" ".join(part.split()) for part in parts if part.strip())
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _file_signature(path: str, key: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CredentialError(f"{key} {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"{key} {path} cannot be read: {exc.strerror}") from None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _read_secret_file(path: str, key: str) -> _Secret:
    """A token, secret_id or JWT from a file; errors name the file, never the content."""
    if not path:
        raise CredentialError(f"{key} is not configured")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SECRET_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CredentialError(f"{key} {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"{key} {path} cannot be read: {exc.strerror}") from None
    if len(raw) > _MAX_SECRET_FILE_BYTES:
        raise CredentialError(f"{key} {path} is larger than {_MAX_SECRET_FILE_BYTES} bytes")
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{key} {path} is not ASCII text") from None
    if not value:
        raise CredentialError(f"{key} {path} is empty")
    if not value.isprintable():
        raise CredentialError(f"{key} {path} holds more than one line or control characters")
    return _Secret(value)
