"""The fleet level: a cache, a lock and an upstream rate budget shared by every replica.

Optional (`[shared] redis_url`). It sits below each process's local cache: a local
hit never reaches it. On a local miss, `InvoiceCache` claims the invoice here
(`SharedLevel.claim`): it reads Redis (or Valkey); on a shared miss, one replica of
the fleet takes a short lock, spends a token of the fleet-wide budget, asks
PlanetScale and shares the answer with the lifetimes its cache gave it; the others
wait for that answer instead of asking too.

Redis is a helper, never a dependency: every command has a short timeout, a failing
Redis is left alone for a moment (one probe a `retry_interval_s`), each outage is
logged once, and meanwhile every request takes the local path (the local cache, then
PlanetScale under the per-process rate cap) as if the shared level were not there.

Redis is untrusted input too: a value read from it passes the same check as an
upstream body, for the requested invoice, or it is a counted shared miss that this
replica's fetch overwrites; the lock and budget keys are checked and always expire.
The connection itself (pool, password file) is `redis_connection`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, TypeVar

import structlog
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import purges
from .config import SharedConfig, UpstreamConfig
from .invoice import InvalidInvoice, check_invoice
from .metrics import SharedMetrics
from .redis_connection import LAG_SLACK_S, close, warm_up
from .resilience import (
    FAIR_LANE,
    CircuitBreaker,
    CircuitState,
    FairQueue,
    Refused,
    loop_timeout,
)
from .upstream import (
    FailureKind,
    Fetched,
    Hold,
    UpstreamFailure,
    spend_deadline,
    wait_bound_s,
)

log = structlog.get_logger("proxy.shared")

T = TypeVar("T")

# Bump when the stored value's layout changes: old entries are then simply not read.
FORMAT_VERSION = "v1"
# A stored answer: status, fresh_until and stale_until (Unix time, inf for final
# invoices), then the body.
_HEADER = struct.Struct("!Hdd")
# Consecutive failures that mark the store down (one stray timeout does not).
_FAILURES = 3
# How a replica polls for the answer another replica is fetching: the first look
# soon, then less often (seconds).
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.1

# Redis is untrusted input: any key may hold anything, of any type, with or without an
# expiry. The scripts read with pcall where a value of another type would raise, and
# never let a forged key without an expiry stand for good.

# Take the lock on a fetch (the tail of _CLAIM and _DISCARD). A lock key of another
# type is forged: replaced. A lock without an expiry is forged too (every lock is set
# with PX): it is given the lifetime of a lock, so it cannot stop the fleet for good.
_TAKE_LOCK = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
local holder = redis.pcall('GET', KEYS[2])
if type(holder) == 'table' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {2}
end
if holder == ARGV[1] then return {2} end
if redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {0}
"""
# Get the answer, or else take the lock. One round trip for the common cases. A fetch
# keeps its token for all its claims: if a reply was lost, the lock it took is its own.
# KEYS: value, lock. ARGV: lock token, lock lifetime (ms).
# Returns {1, value} (an answer), {2} (this fetch holds the lock), {0} (another does)
# or {3} (the value is not a string: dropped; count it, then claim again).
_CLAIM = (
    """
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' then
  redis.call('DEL', KEYS[1])
  return {3}
end
if value then return {1, value} end
"""
    + _TAKE_LOCK
)
# Drop a value found invalid (only if it is still the one read: another replica may
# have written a good one since), then claim as _CLAIM does.
# KEYS: value, lock. ARGV: lock token, lock lifetime (ms), SHA-1 of the invalid value.
_DISCARD = (
    """
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' or (value and redis.sha1hex(value) == ARGV[3]) then
  redis.call('DEL', KEYS[1])
  value = false
end
if value then return {1, value} end
"""
    + _TAKE_LOCK
)
# Store an answer (when given) and drop the lock (when this replica still holds it).
# A fetch that held the lock stores its answer only while it still holds it: a purge
# drops the lock, and the answer fetched before the purge is then not shared.
# KEYS: value, lock. ARGV: lock token or '', packed answer or '', lifetime (ms, 0: none).
_RELEASE = """
local ours = false
if ARGV[1] ~= '' then ours = redis.pcall('GET', KEYS[2]) == ARGV[1] end
if ARGV[2] ~= '' and (ARGV[1] == '' or ours) then
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
end
if ours then redis.call('DEL', KEYS[2]) end
return 1
"""
# Keep the lock while the fetch goes on. KEYS: lock. ARGV: token, lifetime (ms).
# Returns 1 (renewed) or 0 (the lock is gone or another's: a purge, or it expired).
_RENEW = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# A purge: the answer and any lock on its fetch (so a fetch under way does not store
# the purged answer again). KEYS: value, lock. Returns 1 when an answer was there.
_PURGE = """
local found = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return found
"""
# The fleet's upstream budget: GCRA on Redis's own clock, so replicas' clocks do not
# matter. A request whose turn comes within max_wait books its slot and is told how
# long to wait; a later one books nothing and is told when to come back.
# The stored time is untrusted: not a number (or not a string), NaN, or later than
# any booking could reach (ARGV[4]) counts as no budget state. The key always has an
# expiry: one found without is given one.
# Before the budget, PlanetScale's limits as the fleet knows them: while the hold key
# lives (a 429 with Retry-After, or a circuit opened, on any replica), nothing goes;
# after it, the probe key says a probe is due ('due <kind>'): the first request
# granted is the probe ('<token> <kind>'), and the others wait for its outcome.
# KEYS: budget, hold, probe. ARGV: interval between requests (us), burst, max wait (us),
# bound (us), probe token, probe lifetime (ms), longest hold (ms).
# Returns {1, wait_us} (granted after wait_us), {0, wait_us} (refused), {2, wait_us,
# kind} (held off: not before wait_us) or {3, wait_us} (granted: this is the probe).
_BUDGET = """
local hold = redis.call('PTTL', KEYS[2])
if hold == -1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  hold = tonumber(ARGV[7])
end
if hold > 0 then
  local kind = redis.pcall('GET', KEYS[2])
  if type(kind) ~= 'string' then kind = 'rate_limited' end
  return {2, hold * 1000, kind}
end
local probing = false
local probe = redis.pcall('GET', KEYS[3])
if type(probe) == 'table' then
  redis.call('DEL', KEYS[3])
elseif probe then
  local left = redis.call('PTTL', KEYS[3])
  if left == -1 then
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
    left = tonumber(ARGV[6])
  end
  local state, kind = string.match(probe, '^(%S+) (%S+)$')
  if state == 'due' then
    probing = kind
  else
    return {2, math.min(left, 1000) * 1000, kind or 'rate_limited'}
  end
end
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.pcall('GET', KEYS[1])
local tat = nil
if type(stored) == 'string' then tat = tonumber(stored) end
if tat == nil or tat ~= tat or tat > now + tonumber(ARGV[4]) then tat = now end
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - burst * interval - now
if wait < 0 then wait = 0 end
if wait > max_wait then
  if redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) / 1000) + 1000)
  end
  return {0, math.ceil(wait)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.ceil((new_tat - now) / 1000) + 1000)
if probing then
  redis.call('SET', KEYS[3], ARGV[5] .. ' ' .. probing, 'PX', ARGV[6])
  return {3, math.ceil(wait)}
end
return {1, math.ceil(wait)}
"""
# The fleet holds off: a hold of `kind` for ARGV[2] ms (never shortened), then a probe
# is due (for ARGV[3] ms; nobody asking by then: the fleet goes on as usual).
# KEYS: hold, probe. ARGV: kind, hold (ms), probe due (ms).
_HOLD = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('SET', KEYS[2], 'due ' .. ARGV[1], 'PX', ARGV[3])
return 1
"""
# The probe's outcome: PlanetScale answered (the probe key goes: everyone goes on), or
# the probe failed without a new hold (the next request probes). Only the probe's own.
# KEYS: probe. ARGV: token, '1' (answered) or '0', probe due (ms).
_PROBED = """
local value = redis.pcall('GET', KEYS[1])
if type(value) ~= 'string' then return 0 end
local token, kind = string.match(value, '^(%S+) (%S+)$')
if token ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], 'due ' .. kind, 'PX', ARGV[3])
end
return 1
"""
# The longest the fleet holds off for one 429 or open circuit (a Retry-After beyond is
# cut to this), and how long after a hold the probe stays due.
MAX_HOLD_S = 600.0
PROBE_DUE_S = 60.0
HOLD_KINDS = {kind.value: kind for kind in (FailureKind.RATE_LIMITED, FailureKind.CIRCUIT_OPEN)}


class Unavailable(Exception):
    """The shared store did not answer (or is being left alone); take the local path."""


class Shared(NamedTuple):
    """An answer from the shared cache (its layout checked; its body is checked by the level)."""

    status: int
    body: bytes
    fresh_until: float
    stale_until: float


class Budget(NamedTuple):
    """The fleet budget's answer: go (after `wait_s`), or not before `wait_s`.

    `held`: refused because the fleet holds off (PlanetScale's 429, or a circuit open
    somewhere), with what a request refused meanwhile fails with. `probe`: granted as
    the fleet's one probe after a hold; its token, to report the outcome with.
    """

    granted: bool
    wait_s: float
    held: FailureKind | None = None
    probe: str | None = None


class SharedStore:
    """Answers, locks and the fleet budget in Redis; every failure becomes `Unavailable`.

    Keys: `{namespace}:v1:inv:{org:id}` holds an answer, `{namespace}:v1:lock:{org:id}`
    the claim on its fetch (the braces make both one Redis Cluster slot), and
    `{namespace}:v1:budget` the fleet's budget (with credential.per_organization, one per
    organization: `{namespace}:v1:budget:{org}`). Beside each budget, PlanetScale's
    limits as the fleet knows them: `{namespace}:v1:hold:{<budget key>}` and
    `{namespace}:v1:probe:{<budget key>}`, whose hash tag is the whole budget key (which
    has no braces), so the budget script's three keys are one Redis Cluster slot.
    Organization and id never hold `:` (nor braces).

    Built with the client (`redis_connection.make_client`, which connects nothing yet);
    `lifetime` connects it at start-up and closes it at shutdown.
    """

    def __init__(
        self,
        client: Redis,
        config: SharedConfig,
        upstream_config: UpstreamConfig,
        metrics: SharedMetrics,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._prefix = f"{config.namespace}:{FORMAT_VERSION}"
        self._budget_key = f"{self._prefix}:budget"
        self._probe_ms = round((config.lock_ttl_s + upstream_config.deadline_s) * 1000)
        self._purges_key = purges.stream_key(config)
        self._lock_ms = max(1, round(config.lock_ttl_s * 1000))
        self._budget_args = (
            round(60_000_000 / upstream_config.fleet_rate_per_minute),
            upstream_config.fleet_burst,
        )
        self._circuit = CircuitBreaker(_FAILURES, config.retry_interval_s, monotonic)
        self._outage_since: float | None = None
        # Registering computes each script's SHA-1 here; Redis sees them on first use.
        self._claim = client.register_script(_CLAIM)
        self._discard = client.register_script(_DISCARD)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._purge = client.register_script(_PURGE)
        self._budget = client.register_script(_BUDGET)
        self._hold = client.register_script(_HOLD)
        self._probed = client.register_script(_PROBED)
        self._invalid = metrics.lookups.labels(result="invalid")

    async def lifetime(self, _app: object = None) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: connect (the pool warmed up) at start-up, close at shutdown."""
        try:
            # Not reachable at start is an outage at once (logged); the service starts.
            await self._run("ping", lambda r: r.ping(), decisive=True)
        except Unavailable:
            pass
        else:
            await warm_up(self._redis, self._config.max_connections)
            log.info("shared_store_connected", namespace=self._config.namespace)
        try:
            yield
        finally:
            await close(self._redis)

    @property
    def available(self) -> bool:
        """False while an outage is known (commands are then not even tried)."""
        return self._outage_since is None

    def _keys(self, organization: str, invoice_id: str) -> list[str]:
        tag = f"{{{organization}:{invoice_id}}}"
        return [f"{self._prefix}:inv:{tag}", f"{self._prefix}:lock:{tag}"]

    async def _run(
        self, operation: str, command: Callable[[Redis], Awaitable[T]], *, decisive: bool = False
    ) -> T:
        """One command within the timeout; a failure is counted, and `Unavailable`.

        `_FAILURES` failures in a row are an outage (one stray timeout is not), or one
        `decisive` failure.
        """
        if not self._circuit.allow():
            raise Unavailable()
        try:
            # Timed as Redis answers, not as this loop gets to the answer: a busy
            # replica is not a Redis outage (up to LAG_SLACK_S more, when busy).
            async with loop_timeout(self._config.timeout_s, LAG_SLACK_S):
                result = await command(self._redis)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc, decisive)
            raise Unavailable() from None
        except BaseException:
            self._circuit.release()
            raise
        self._circuit.record_success()
        if self._outage_since is not None:
            log.info(
                "shared_store_recovered",
                outage_s=round(self._monotonic() - self._outage_since, 3),
            )
            self._outage_since = None
            self._metrics.up.set(1)
        return result

    def _failed(self, operation: str, exc: BaseException, decisive: bool) -> None:
        self._metrics.errors.labels(operation=operation).inc()
        self._circuit.record_failure()
        if self._outage_since is None and (decisive or self._circuit.state == CircuitState.OPEN):
            self._outage_since = self._monotonic()
            self._metrics.up.set(0)
            # The class name says what failed (timeout, refused, auth); a message could
            # hold an address, never a password, but is not needed.
            log.warning(
                "shared_store_unavailable",
                operation=operation,
                error=type(exc).__name__,
                retry_interval_s=self._config.retry_interval_s,
            )

    async def ping(self) -> None:
        await self._run("ping", lambda r: r.ping())

    async def get(self, organization: str, invoice_id: str) -> Shared | None:
        """The stored answer, or None (also for a value that fails `_unpack`; counted)."""
        key = self._keys(organization, invoice_id)[0]
        raw = await self._run("get", lambda r: r.get(key))
        if not isinstance(raw, bytes):
            return None
        try:
            return _unpack(raw)
        except InvalidShared as exc:
            self.invalid(exc.reason)
            return None

    @staticmethod
    def new_token() -> str:
        """A lock token: one per fetch, kept for all its claims."""
        return secrets.token_hex(8)

    async def claim(self, organization: str, invoice_id: str, token: str) -> Shared | bool:
        """The stored answer; else the lock: True when `token` holds it, False if another does.

        A value that fails `_unpack` is counted, dropped and claimed past, as if Redis
        had nothing.
        """
        keys = self._keys(organization, invoice_id)
        args: list[str | int] = [token, self._lock_ms]
        reply = await self._run("claim", lambda _: self._claim(keys=keys, args=args))
        if reply[0] == 3:  # not a string: the script dropped it
            self.invalid("type")
            reply = await self._run("claim", lambda _: self._claim(keys=keys, args=args))
        if reply[0] != 1:
            return bool(reply[0] == 2)
        try:
            return _unpack(reply[1])
        except InvalidShared as exc:
            self.invalid(exc.reason)
        return await self._discard_and_claim(keys, token, _digest(reply[1]))

    async def discard(
        self, organization: str, invoice_id: str, token: str, answer: Shared
    ) -> Shared | bool:
        """Drop an answer found invalid (counted by the caller), then claim as `claim` does."""
        keys = self._keys(organization, invoice_id)
        return await self._discard_and_claim(keys, token, _digest(_pack(answer)))

    async def _discard_and_claim(self, keys: list[str], token: str, digest: str) -> Shared | bool:
        args: list[str | int] = [token, self._lock_ms, digest]
        reply = await self._run("claim", lambda _: self._discard(keys=keys, args=args))
        if reply[0] != 1:
            return bool(reply[0] == 2)
        try:
            return _unpack(reply[1])  # written anew since it was read
        except InvalidShared as exc:
            self.invalid(exc.reason)
            return False  # invalid again at once: wait for a good one, or the lock

    def invalid(self, reason: str) -> None:
        """A stored value failed the check: counted and logged once, never shown."""
        self._invalid.inc()
        log.warning("shared_value_invalid", reason=reason)

    async def lock(self, organization: str, invoice_id: str, token: str) -> bool:
        """Take the lock whatever is stored; False when another fetch holds it."""
        key = self._keys(organization, invoice_id)[1]
        taken = await self._run("claim", lambda r: r.set(key, token, nx=True, px=self._lock_ms))
        return bool(taken)

    async def unlock(self, organization: str, invoice_id: str, token: str) -> None:
        """Drop the lock, if this token still holds it."""
        await self.put(organization, invoice_id, None, token)

    async def put(
        self, organization: str, invoice_id: str, answer: Shared | None, token: str | None = None
    ) -> None:
        """Store an answer (kept while fresh; final ones `final_ttl_s`) and drop our lock."""
        packed, ttl_ms = b"", 0
        if answer is not None:
            if answer.fresh_until == math.inf:
                ttl_ms = round(self._config.final_ttl_s * 1000)
            else:
                ttl_ms = math.floor((answer.fresh_until - self._clock()) * 1000)
                if ttl_ms <= 0:
                    answer = None  # already stale (e.g. not_found_ttl_s = 0): not shared
            if answer is not None:
                packed = _pack(answer)
        if not packed and not token:
            return
        keys = self._keys(organization, invoice_id)
        await self._run(
            "release", lambda _: self._release(keys=keys, args=[token or "", packed, ttl_ms])
        )

    async def delete(self, organization: str, invoice_id: str) -> bool:
        """Drop a stored answer and any lock on its fetch; False when there was no answer."""
        keys = self._keys(organization, invoice_id)
        return bool(await self._run("delete", lambda _: self._purge(keys=keys)))

    async def announce_purge(self, organization: str, invoice_id: str) -> None:
        """Tell every process of the fleet to drop its local copy (`proxy.purges`)."""
        key = self._purges_key
        await self._run("delete", lambda r: purges.announce(r, key, organization, invoice_id))

    async def renew(self, organization: str, invoice_id: str, token: str) -> bool:
        """Extend the lock by its lifetime; False when it is no longer this token's."""
        key = self._keys(organization, invoice_id)[1]
        renewed = await self._run(
            "renew", lambda _: self._renew(keys=[key], args=[token, self._lock_ms])
        )
        return bool(renewed == 1)

    def budget_key(self, organization: str) -> str:
        """The budget's key: the fleet's one, or (non-empty `organization`) its own."""
        return f"{self._budget_key}:{organization}" if organization else self._budget_key

    async def take_budget(self, max_wait_s: float, organization: str = "") -> Budget:
        """One upstream request from the fleet's budget (or `organization`'s); see `Budget`."""
        interval_us, burst = self._budget_args
        max_wait_us = round(max_wait_s * 1_000_000)
        # No replica books further ahead than burst, one interval and its wait; twice
        # that leaves room for replicas configured otherwise during a rollout.
        bound_us = 2 * ((burst + 1) * interval_us + max_wait_us) + 1_000_000
        token = self.new_token()
        max_hold_ms = round(MAX_HOLD_S * 1000)
        args: list[str | int] = [
            interval_us,
            burst,
            max_wait_us,
            bound_us,
            token,
            self._probe_ms,
            max_hold_ms,
        ]
        keys = [
            self.budget_key(organization),
            self.hold_key(organization),
            self.probe_key(organization),
        ]
        reply = await self._run("budget", lambda _: self._budget(keys=keys, args=args))
        try:
            granted, wait_us = int(reply[0]), int(reply[1])
            held = (
                HOLD_KINDS.get(_text(reply[2]), FailureKind.RATE_LIMITED) if granted == 2 else None
            )
        except (TypeError, ValueError, IndexError, UnicodeDecodeError):
            granted, wait_us, held = -1, -1, None
        bound = max_hold_ms * 1000 if granted == 2 else bound_us
        if granted not in (0, 1, 2, 3) or not 0 <= wait_us <= bound:
            self._metrics.errors.labels(operation="budget").inc()
            raise Unavailable()
        if granted == 2:
            return Budget(False, wait_us / 1_000_000, held=held)
        return Budget(granted > 0, wait_us / 1_000_000, probe=token if granted == 3 else None)

    def hold_key(self, organization: str) -> str:
        """The hold beside a budget (the fleet's, or `organization`'s): its Cluster slot."""
        return f"{self._prefix}:hold:{{{self.budget_key(organization)}}}"

    def probe_key(self, organization: str) -> str:
        """The probe after a hold, beside the same budget (its Cluster slot too)."""
        return f"{self._prefix}:probe:{{{self.budget_key(organization)}}}"

    async def hold_off(self, kind: FailureKind, seconds: float, organization: str = "") -> None:
        """The whole fleet holds off for `seconds` (at most MAX_HOLD_S); then one probe.

        Non-empty `organization`: only that organization's requests (per_organization).
        """
        hold_ms = max(1, round(min(seconds, MAX_HOLD_S) * 1000))
        args = [kind.value, hold_ms, hold_ms + round(PROBE_DUE_S * 1000)]
        keys = [self.hold_key(organization), self.probe_key(organization)]
        await self._run("budget", lambda _: self._hold(keys=keys, args=args))

    async def probed(self, token: str, *, answered: bool, organization: str = "") -> None:
        """The probe's outcome: PlanetScale answered (all go on), or the next one probes."""
        args = [token, "1" if answered else "0", round(PROBE_DUE_S * 1000)]
        keys = [self.probe_key(organization)]
        await self._run("budget", lambda _: self._probed(keys=keys, args=args))


class Probe(NamedTuple):
    """This fetch is the fleet's probe after a hold: its token, and whose budget it is."""

    token: str
    organization: str  # "" for the fleet's one budget


class HeldOff(Refused):
    """The fleet holds off (PlanetScale's limit, or an open circuit): `kind` says which."""

    def __init__(self, retry_after_s: float, kind: FailureKind) -> None:
        super().__init__(retry_after_s)
        self.kind = kind

    def again(self) -> HeldOff:
        return HeldOff(self.retry_after_s, self.kind)


def _held(kind: FailureKind, seconds: float) -> UpstreamFailure:
    if kind == FailureKind.CIRCUIT_OPEN:
        message = "PlanetScale is failing; the fleet stopped calling it for a moment"
    else:
        message = "PlanetScale's rate limit holds for the fleet; retry after the given delay"
    return UpstreamFailure(kind, message, retry_after=max(0.001, seconds))


class InvalidShared(Exception):
    """A stored value that is not an answer this replica could have written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # a fixed word for logs and metrics, never the value


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pack(answer: Shared) -> bytes:
    return _HEADER.pack(answer.status, answer.fresh_until, answer.stale_until) + answer.body


def _digest(raw: bytes) -> str:
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()


def _unpack(raw: bytes) -> Shared:
    """The stored answer's layout and lifetimes, checked; raise InvalidShared otherwise.

    Status 200 or 404; fresh_until finite or +inf (final), stale_until not before it
    (never NaN); a 404 is never final and has no body. The body of a 200 is checked by
    `SharedLevel` (it knows the schema mode).
    """
    if len(raw) < _HEADER.size:
        raise InvalidShared("format")
    status, fresh_until, stale_until = _HEADER.unpack_from(raw)
    body = raw[_HEADER.size :]
    if status not in (200, 404):
        raise InvalidShared("status")
    if not (math.isfinite(fresh_until) or fresh_until == math.inf) or not (
        stale_until >= fresh_until
    ):
        raise InvalidShared("lifetimes")
    if status == 404 and (body or fresh_until == math.inf):
        raise InvalidShared("not_found")
    return Shared(status, body, fresh_until, stale_until)


class Found(NamedTuple):
    """A shared answer whose body passed the check, with the lifetimes it was stored with."""

    fetched: Fetched
    fresh_until: float
    stale_until: float


async def _twice(store: SharedStore, call: Callable[[], Awaitable[T]]) -> T:
    """A store call, once more after a stray failure: going without Redis is for outages."""
    try:
        return await call()
    except Unavailable:
        if not store.available:
            raise
        return await call()


class Turn:
    """One local miss's dealings with the fleet, given by `SharedLevel.claim`.

    `found` is the fleet's answer (stored, or another replica's awaited). Without one,
    this replica asks PlanetScale (`fetch`, within the fleet budget) and gives the
    answer to the others (`share`, with the lifetimes the cache decided).
    """

    __slots__ = ("_budget", "_invoice_id", "_organization", "_shares", "_store", "found", "token")

    def __init__(
        self,
        store: SharedStore,
        budget: Callable[[str], Awaitable[Probe | None]],
        organization: str,
        invoice_id: str,
        *,
        found: Found | None = None,
        token: str | None = None,
        shares: bool = True,
    ) -> None:
        self._store = store
        self._budget = budget
        self._organization = organization
        self._invoice_id = invoice_id
        self.found = found
        self.token = token  # the lock this fetch holds; None: no lock (waited it out, or alone)
        self._shares = shares  # False while Redis is out: nothing to share, nobody waits

    async def fetch(self, upstream: Callable[[], Awaitable[Fetched]]) -> Fetched:
        """Ask PlanetScale within the fleet budget; on failure the lock is dropped at once.

        The fleet's probe after a hold reports how it went: answered, everyone goes on.
        """
        probe = None
        try:
            probe = await self._budget(self._organization)
            fetched = await upstream()
        except BaseException:
            if self.token is not None:
                with contextlib.suppress(Unavailable):  # counted and logged by the store
                    await self._store.unlock(self._organization, self._invoice_id, self.token)
            if probe is not None:
                with contextlib.suppress(Unavailable):
                    await self._store.probed(
                        probe.token, answered=False, organization=probe.organization
                    )
            raise
        if probe is not None:
            with contextlib.suppress(Unavailable):
                await self._store.probed(
                    probe.token, answered=True, organization=probe.organization
                )
        return fetched

    async def share(self, fetched: Fetched, fresh_until: float, stale_until: float) -> None:
        """Store the answer for the fleet and drop the lock; until then the others wait."""
        if not self._shares:
            return
        answer = Shared(fetched.status, fetched.body, fresh_until, stale_until)
        store = self._store
        with contextlib.suppress(Unavailable):  # counted and logged by the store
            await _twice(
                store, lambda: store.put(self._organization, self._invoice_id, answer, self.token)
            )


class _BudgetView:
    """One budget as this replica sees it: its waiting fetches, and its hold-off
    (monotonic; known also while Redis is out)."""

    __slots__ = ("held_kind", "held_until", "organization", "queue")

    def __init__(self, organization: str, queue: FairQueue[tuple[Counter, Probe | None]]) -> None:
        self.organization = organization  # "" for the fleet's one budget
        self.queue = queue
        self.held_until = 0.0
        self.held_kind = FailureKind.RATE_LIMITED

    def hold_until(self, until: float, kind: FailureKind) -> None:
        """Hold off until `until` (never shortened)."""
        if until > self.held_until:
            self.held_until, self.held_kind = until, kind


class SharedLevel:
    """The fleet's one fetch per invoice, below each replica's `InvoiceCache`.

    The local cache already makes concurrent local misses one `claim` here; this makes
    the misses of all replicas one upstream request. The cache decides lifetimes, for
    its own entries and for the fleet's (`Turn.share`), so both levels keep an answer
    exactly as long.

    What Redis holds is checked as an upstream body is (`upstream_config` gives the
    schema mode): a value that fails is a shared miss, counted, and overwritten by
    this replica's own fetch.
    """

    def __init__(
        self,
        config: SharedConfig,
        upstream_config: UpstreamConfig,
        store: SharedStore,
        metrics: SharedMetrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        per_organization: bool = False,
        max_budgets: int = 1,
    ) -> None:
        self._config = config
        self._strict = upstream_config.strict_schema
        # With per_organization, a budget per organization (PlanetScale's limits are per
        # organization), the `max_budgets` most recently used ones queued here.
        self._per_organization = per_organization
        self._max_budgets = max(1, max_budgets)
        # A holder renews its lock while it fetches, and a fetch ends within the
        # upstream deadline; a holder that died lets its lock expire within lock_ttl_s.
        self._max_lock_wait_s = config.lock_ttl_s + upstream_config.deadline_s
        # The budget's wait is the first of a fetch's waits: all of them share the
        # deadline, less the room kept for the attempt.
        self._fleet_max_wait_s = min(
            upstream_config.fleet_max_wait_s, wait_bound_s(upstream_config)
        )
        self._store = store
        self._monotonic = monotonic
        self._sleep = sleep
        lookups = metrics.lookups
        self._hit = lookups.labels(result="hit")
        self._miss = lookups.labels(result="miss")
        self._coalesced = lookups.labels(result="coalesced")
        self._unavailable = lookups.labels(result="unavailable")
        budget = metrics.budget
        self._granted = budget.labels(result="granted")
        self._waited = budget.labels(result="waited")
        self._refused = budget.labels(result="refused")
        self._budget_unavailable = budget.labels(result="unavailable")
        self._held = budget.labels(result="held")
        self._probe = budget.labels(result="probe")
        self._holds: set[asyncio.Task[None]] = set()
        self._interval_s = 60.0 / upstream_config.fleet_rate_per_minute
        self._burst = upstream_config.fleet_burst
        self._budgets: OrderedDict[str, _BudgetView] = OrderedDict()

    def _budget_view(self, organization: str) -> _BudgetView:
        """This replica's side of one budget (the fleet's, or with per_organization the
        organization's): its waiting fetches and its hold, the `max_budgets` most
        recently used kept."""
        key = organization if self._per_organization else ""
        view = self._budgets.get(key)
        if view is not None:
            self._budgets.move_to_end(key)
            return view
        interval_s, burst = self._interval_s, self._burst
        queue: FairQueue[tuple[Counter, Probe | None]] = FairQueue(
            lambda max_wait_s: self._book_budget(max_wait_s, key),
            # Optimistic (the burst unspent, no other replica waiting): only a wait that
            # cannot fit is refused before asking Redis, whose booking has the last word.
            lambda grants: max(0, grants - burst) * interval_s,
            clock=self._monotonic,
            sleep=self._sleep,
            name="fleet-budget",
        )
        view = _BudgetView(key, queue)
        self._budgets[key] = view
        if len(self._budgets) > self._max_budgets:
            self._budgets.popitem(last=False)
        return view

    @contextlib.asynccontextmanager
    async def claim(self, organization: str, invoice_id: str) -> AsyncIterator[Turn]:
        """A shared answer, another replica's awaited, or this replica's turn to fetch.

        While a turn that holds the lock lasts, the lock is renewed.
        """
        turn = await self._turn(organization, invoice_id)
        if turn.token is None:
            yield turn
            return
        renewal = asyncio.create_task(
            self._keep_lock(organization, invoice_id, turn.token), name="shared-lock-renewal"
        )
        try:
            yield turn
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def _turn(self, organization: str, invoice_id: str) -> Turn:
        store = self._store
        token = store.new_token()
        try:
            found = await _twice(store, lambda: self._claim(organization, invoice_id, token))
        except Unavailable:
            return self._alone(organization, invoice_id)
        if isinstance(found, Found):
            self._hit.inc()
            return Turn(store, self._take_budget, organization, invoice_id, found=found)
        holds = found
        # Another replica is fetching: wait for its answer. It renews its lock while it
        # fetches; if it dies, the lock expires within lock_ttl_s and a claim here
        # takes it over.
        deadline = self._monotonic() + self._max_lock_wait_s
        delay = POLL_FIRST_S
        while not holds and (remaining := deadline - self._monotonic()) > 0:
            await self._sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX_S)
            try:
                found = await self._claim(organization, invoice_id, token)
            except Unavailable:
                if not store.available:
                    return self._alone(organization, invoice_id)
                continue  # a stray failure: keep waiting for the holder's answer
            if isinstance(found, Found):
                self._coalesced.inc()
                return Turn(store, self._take_budget, organization, invoice_id, found=found)
            holds = found
        self._miss.inc()
        return Turn(
            store, self._take_budget, organization, invoice_id, token=token if holds else None
        )

    def _alone(self, organization: str, invoice_id: str) -> Turn:
        """Redis did not answer: no coordination, but the budget still if Redis allows."""
        self._unavailable.inc()
        # During an outage the budget answers at once, under the local cap only.
        return Turn(self._store, self._take_budget, organization, invoice_id, shares=False)

    async def _claim(self, organization: str, invoice_id: str, token: str) -> Found | bool:
        """A stored answer that passes the check; else whether `token` holds the lock."""
        claim = await self._store.claim(organization, invoice_id, token)
        if not isinstance(claim, Shared):
            return claim
        found = self._accepted(invoice_id, claim)
        if found is not None:
            return found
        claim = await self._store.discard(organization, invoice_id, token, claim)
        if not isinstance(claim, Shared):
            return claim
        return self._accepted(invoice_id, claim) or False  # else wait for a good one

    def _accepted(self, invoice_id: str, shared: Shared) -> Found | None:
        """The stored answer if its body passes the check, or None (counted, logged)."""
        facts = None
        if shared.status == 200:
            try:
                facts = check_invoice(shared.body, strict=self._strict, invoice_id=invoice_id)
            except InvalidInvoice:
                self._store.invalid("body")
                return None
        fetched = Fetched(shared.status, shared.body, facts)
        return Found(fetched, shared.fresh_until, shared.stale_until)

    async def _keep_lock(self, organization: str, invoice_id: str, token: str) -> None:
        """Renew the lock every third of its lifetime, so the others keep waiting for us.

        Chosen over a lock as long as the upstream deadline: a replica that dies still
        frees its invoice within lock_ttl_s, not deadline_s.
        """
        interval = self._config.lock_ttl_s / 3
        while True:
            await self._sleep(interval)
            try:
                if not await self._store.renew(organization, invoice_id, token):
                    return  # purged, or expired during an outage: no longer ours to keep
            except Unavailable:
                continue  # counted by the store; the lock lasts two more tries
            except Exception as exc:
                # A bug must not pass silently; the lock then expires by itself.
                log.error("shared_lock_renewal_failed", error=type(exc).__name__)
                return

    def hold(self, hold: Hold) -> None:
        """`Upstream`'s `on_hold`: PlanetScale asked for a pause, or the circuit opened.

        This replica holds off at once (also while Redis is out); the fleet through Redis.
        With per_organization, only `hold.organization`'s requests hold off.
        """
        seconds = min(hold.seconds, MAX_HOLD_S)
        view = self._budget_view(hold.organization)
        view.hold_until(self._monotonic() + seconds, hold.kind)
        where = {"organization": view.organization} if view.organization else {}
        log.warning("fleet_hold_off", kind=hold.kind.value, seconds=round(seconds, 3), **where)
        task = asyncio.create_task(
            self._share_hold(hold.kind, seconds, view.organization), name="fleet-hold"
        )
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)

    async def _share_hold(self, kind: FailureKind, seconds: float, organization: str) -> None:
        store = self._store
        with contextlib.suppress(Unavailable):  # counted and logged by the store
            await _twice(store, lambda: store.hold_off(kind, seconds, organization))

    async def _take_budget(self, organization: str) -> Probe | None:
        """A request from the fleet's budget (or the organization's), in this fetch's
        lane's turn; the probe when this request is the fleet's probe after a hold.

        It waits while the wait fits `fleet_max_wait_s` (the deadline less the attempt's
        room, by default); beyond that the answer is 429 with when to come back. While
        the fleet holds off, the answer is at once PlanetScale's limit (429) or the open
        circuit (503), with when to come back. The time waited is spent from the
        fetch's deadline.
        """
        start = self._monotonic()
        view = self._budget_view(organization)
        if start < view.held_until:
            self._held.inc()
            raise _held(view.held_kind, view.held_until - start)
        try:
            counted, probe = await view.queue.acquire(FAIR_LANE.get(), self._fleet_max_wait_s)
        except HeldOff as held:
            self._held.inc()
            view.hold_until(self._monotonic() + held.retry_after_s, held.kind)
            raise _held(held.kind, held.retry_after_s) from None
        except Refused as refused:
            self._refused.inc()
            raise UpstreamFailure(
                FailureKind.RATE_LIMITED,
                "the fleet's budget of PlanetScale requests is spent; retry after the given delay",
                retry_after=refused.retry_after_s,
            ) from None
        counted.inc()
        spend_deadline(self._monotonic() - start)
        return probe

    async def _book_budget(
        self, max_wait_s: float, organization: str
    ) -> tuple[float, tuple[Counter, Probe | None]]:
        """The fleet's next request: (wait, (the counter of how it went, the probe)), or
        `Refused` (`HeldOff` while the fleet, or `organization`, holds off)."""
        store = self._store
        try:
            budget = await _twice(store, lambda: store.take_budget(max_wait_s, organization))
        except Unavailable:
            # An outage: the local rate cap and this replica's own hold still hold.
            return 0.0, (self._budget_unavailable, None)
        except Exception as exc:
            # An answer the store did not expect is not a reason to refuse every miss:
            # as in an outage, the local cap still holds.
            log.warning("fleet_budget_failed", error=type(exc).__name__)
            return 0.0, (self._budget_unavailable, None)
        if budget.held is not None:
            raise HeldOff(budget.wait_s, budget.held)
        if not budget.granted:
            raise Refused(budget.wait_s)
        if budget.probe is not None:
            log.info("fleet_probe")
            return budget.wait_s, (self._probe, Probe(budget.probe, organization))
        return budget.wait_s, (self._waited if budget.wait_s > 0 else self._granted, None)

    async def purge(self, organization: str, invoice_id: str) -> bool | None:
        """Drop the shared copy and tell every process to drop its own: True when Redis
        had a copy, False when not, None when Redis did not answer (the fleet's copies
        may still be there).

        The other processes are told even when Redis had none: a copy kept locally
        past its Redis lifetime (within its stale window) goes too.
        """
        try:
            found = await self._store.delete(organization, invoice_id)
            await self._store.announce_purge(organization, invoice_id)
        except Unavailable:
            return None
        return found

    @property
    def retry_interval_s(self) -> float:
        """How soon the store is tried again after an outage is seen."""
        return self._config.retry_interval_s
