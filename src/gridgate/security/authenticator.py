"""Who a connection is, for every protocol (DESIGN section 10).

One ``Authenticator`` holds the credential stores and the ACL, and makes
failed guesses cost the guesser, not the server:

- a banned source address is refused first, before any hashing;
- every failure is answered after ``failure_delay_ms`` of ``trio.sleep``:
  the caller's connection is held, no CPU is spent;
- ``failures_before_ban`` failures from one address within
  ``failure_window_s`` ban it for ``ban_s``;
- a successful check is remembered for ``cache_s`` under a hash of its
  credentials, so a reconnect storm skips PBKDF2 and signature checks.

Every table (bans, failure counts, the cache) has a size bound and expiry.
Time is ``trio.current_time()`` so that tests run under MockClock. Failure
reasons are fixed labels (never an id or a secret), fit for metrics.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

from gridgate.config import ConfigError
from gridgate.security.acl import ACL
from gridgate.security.jwt_keys import JWTKeys, JWTRejected, looks_like_jwt
from gridgate.security.passwords import MAX_PASSWORD_BYTES, PasswordFile, PasswordHash, hash_password
from gridgate.security.tls import certificate_identity

if TYPE_CHECKING:
    from gridgate.config import Config
    from gridgate.observability.metrics import Metrics

__all__ = ["Identity", "ANONYMOUS", "AuthFailure", "Authenticator", "FAILURE_REASONS", "load_authenticator",
           "source_address"]

log = logging.getLogger("gridgate.auth")
K = TypeVar("K")
V = TypeVar("V")

# Why an authentication failed: the metrics' reason label.
FAILURE_REASONS = (
    "no_credentials",      # none given where they are required (answered at once, not counted for bans)
    "unknown_identity",    # no such id in any store
    "bad_password",
    "bad_token",           # a JWT that does not verify
    "too_long",            # a password over MAX_PASSWORD_BYTES: refused before hashing
    "bad_header",          # an Authorization header that is neither Basic nor Bearer, or undecodable
    "banned",              # the source address is banned
)

# Bounds of the tables (entries). At the bound, expired entries go first,
# then the oldest.
CACHE_MAX = 100_000
FAILURES_MAX = 100_000
BANS_MAX = 100_000
# A $7$ entry with more iterations than this is hashed in a worker thread
# (0.7 ms of CPU at 1,000; 7-14 ms at 10,000), so the event loop keeps
# serving meanwhile; below it the thread hand-off would cost more than the hash.
INLINE_ITERATIONS = 1_000
_HASH_THREADS = 2
# Hashed for an unknown id, so that it costs what a known one does.
_DUMMY = hash_password(b"gridgate", salt=b"\0" * 12)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated principal: a device id, or one the ACL lets write
    for other devices. ``method``: "password", "jwt" or "certificate"."""

    name: str
    method: str


# What a connection served without credentials (anonymous on purpose) is,
# for a reload to judge (Session.identity).
ANONYMOUS = Identity("", "anonymous")


class AuthFailure(Exception):
    """Authentication failed; ``reason`` is one of FAILURE_REASONS, ``detail``
    says more for the log (never a secret)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def source_address(remote: str) -> str:
    """The address part of a session's ``remote`` ("10.0.0.7:5555",
    "[::1]:5555"): bans are per address, whatever the port."""
    if remote.startswith("["):
        return remote[1:remote.find("]")] if "]" in remote else remote
    host, sep, port = remote.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else remote


def _proxy_certificate_cn(stream: object) -> str | None:
    for candidate in (stream, getattr(stream, "transport", None)):
        name = getattr(candidate, "proxy_certificate_cn", None)
        if isinstance(name, str) and name:
            return name
    return None


def _bounded_insert(table: dict[K, V], key: K, value: V, limit: int, expired: Callable[[V], bool]) -> None:
    """Set ``table[key]``; at ``limit`` entries drop the ``expired`` ones
    first, then the oldest tenth if that freed too few (one scan per tenth
    of the table filled, not per insert)."""
    if key not in table and len(table) >= limit:
        for k in [k for k, v in table.items() if expired(v)]:
            del table[k]
        if len(table) >= limit * 9 // 10:
            for k in list(table)[: max(1, limit // 10)]:
                del table[k]
    table[key] = value


class Authenticator:
    """The credential stores, the ACL and the failure accounting."""

    def __init__(self, config: Config, *, passwords: PasswordFile | None = None, jwt_keys: JWTKeys | None = None,
                 acl: ACL | None = None, metrics: Metrics | None = None) -> None:
        auth = config.auth
        self.passwords = passwords
        self.jwt_keys = jwt_keys
        self.acl = acl if acl is not None else ACL()
        self.metrics = metrics
        # Anonymous clients are served when no store is configured at all, or on purpose.
        self.anonymous_allowed = auth.allow_anonymous or not config.has_credential_store
        self.failure_delay_s = auth.failure_delay_ms / 1000.0
        self.failures_before_ban = auth.failures_before_ban
        self.failure_window_s = auth.failure_window_s
        self.ban_s = auth.ban_s
        self.cache_s = auth.cache_s
        self.certificate_mode = config.tls.identity
        # credential hash -> (identity, monotonic expiry)
        self._cache: dict[bytes, tuple[Identity, float]] = {}
        # address -> [failures, window start]
        self._failures: dict[str, list[float]] = {}
        # address -> monotonic end of the ban
        self._bans: dict[str, float] = {}
        self._hash_limiter = trio.CapacityLimiter(_HASH_THREADS)

    # -- bans ---------------------------------------------------------------------

    def is_banned(self, address: str) -> bool:
        until = self._bans.get(address)
        if until is None:
            return False
        if until <= trio.current_time():
            del self._bans[address]
            return False
        return True

    def active_bans(self) -> list[tuple[str, float]]:
        """(address, monotonic end) of every ban in force, for GET /v1/bans."""
        now = trio.current_time()
        return sorted(((a, until) for a, until in self._bans.items() if until > now), key=lambda b: b[1])

    def lift_ban(self, address: str) -> bool:
        """DELETE /v1/bans/address/{address}: True if a ban was in force."""
        until = self._bans.pop(address, None)
        self._failures.pop(address, None)
        return until is not None and until > trio.current_time()

    def refuse_banned(self, protocol: str, address: str) -> None:
        """Raise AuthFailure("banned") if ``address`` is banned (counted), at once."""
        if self._bans and self.is_banned(address):
            if self.metrics is not None:
                self.metrics.auth_banned_connections.labels(protocol).inc()
                self.metrics.auth_failures.labels(protocol, "banned").inc()
            raise AuthFailure("banned", "the source address is banned for repeated authentication failures")

    def _count_failure(self, address: str) -> None:
        now = trio.current_time()
        entry = self._failures.get(address)
        if entry is None or now - entry[1] > self.failure_window_s:
            entry = [0, now]
            _bounded_insert(self._failures, address, entry, FAILURES_MAX,
                            lambda e: now - e[1] > self.failure_window_s)
        entry[0] += 1
        if entry[0] >= self.failures_before_ban and self.ban_s > 0:
            del self._failures[address]
            _bounded_insert(self._bans, address, now + self.ban_s, BANS_MAX, lambda until: until <= now)
            if self.metrics is not None:
                self.metrics.auth_bans.inc()
            log.warning("banning %s for %.0f s: %d failed authentications within %.0f s", address, self.ban_s,
                        self.failures_before_ban, self.failure_window_s)

    async def _fail(self, protocol: str, address: str, reason: str, detail: str, who: str) -> AuthFailure:
        """Count a failure, wait the delay, and return the error to raise."""
        self._count_failure(address)
        if self.metrics is not None:
            self.metrics.auth_failures.labels(protocol, reason).inc()
        log.info("%s authentication failed from %s for %r: %s (%s)", protocol, address, who[:128], reason, detail)
        if self.failure_delay_s > 0:
            await trio.sleep(self.failure_delay_s)
        return AuthFailure(reason, detail)

    # -- the cache ------------------------------------------------------------------

    def cached(self, key: bytes, protocol: str) -> Identity | None:
        """The identity a recent successful check with these credentials
        proved, or None (a miss: check them)."""
        hit = self._cache.get(key)
        if hit is None:
            return None
        identity, until = hit
        if until <= trio.current_time():
            del self._cache[key]
            return None
        if self.metrics is not None:
            self.metrics.auth_cache_hits.labels(protocol).inc()
            self.metrics.auth_successes.labels(protocol, identity.method).inc()
        return identity

    def _remember(self, key: bytes, identity: str, method: str, protocol: str, lifetime_s: float) -> Identity:
        found = Identity(identity, method)
        now = trio.current_time()
        ttl = min(self.cache_s, lifetime_s)
        if ttl > 0:
            _bounded_insert(self._cache, key, (found, now + ttl), CACHE_MAX, lambda hit: hit[1] <= now)
        if self.metrics is not None:
            self.metrics.auth_successes.labels(protocol, method).inc()
        return found

    @staticmethod
    def credentials_key(*parts: str | bytes) -> bytes:
        """The cache key of some credentials: a hash, so the cache holds no secret."""
        h = hashlib.sha256()
        for part in parts:
            data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
            h.update(len(data).to_bytes(4, "big"))
            h.update(data)
        return h.digest()

    # -- checks -------------------------------------------------------------------------

    async def check_password(self, protocol: str, address: str, username: str, password: bytes,
                             client_id: str | None = None) -> Identity:
        """MQTT's user name and password: a JWT when JWT keys are configured
        and the password is shaped like one (then ``sub``, or ``client_id``,
        names the identity), else a password file entry.

        Raises:
            AuthFailure: after the failure delay (at once when banned).
        """
        self.refuse_banned(protocol, address)
        # the cache first, whatever the password is: a reconnecting device
        # costs one hash (a JWT without sub proves the client id: it is in the key)
        key = self.credentials_key(b"mqtt", username, password, client_id or "")
        identity = self.cached(key, protocol)
        if identity is not None:
            return identity
        if self.jwt_keys is not None and looks_like_jwt(password):
            return await self._check_jwt(protocol, address, password.decode("ascii"), client_id, key)
        return await self._check_password_file(protocol, address, username, password, key)

    async def check_authorization(self, protocol: str, address: str, header: str) -> Identity | None:
        """An HTTP ``Authorization`` header: ``Bearer <JWT>`` or ``Basic``
        (password file). None: no header and anonymous clients are allowed.

        Raises:
            AuthFailure: ``no_credentials`` at once; others after the delay.
        """
        self.refuse_banned(protocol, address)
        if not header:
            if self.anonymous_allowed:
                return None
            if self.metrics is not None:
                self.metrics.auth_failures.labels(protocol, "no_credentials").inc()
            raise AuthFailure("no_credentials", "an Authorization header is required")
        key = self.credentials_key(b"header", header)
        identity = self.cached(key, protocol)
        if identity is not None:
            return identity
        scheme, _, value = header.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return await self._check_jwt(protocol, address, value, None, key)
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise await self._fail(protocol, address, "bad_header", "Basic credentials are not base64", "?") \
                    from None
            username, sep, password = decoded.partition(b":")
            if not sep:
                raise await self._fail(protocol, address, "bad_header", "Basic credentials have no ':'", "?")
            name = username.decode("utf-8", "replace")
            return await self._check_password_file(protocol, address, name, password, key)
        raise await self._fail(protocol, address, "bad_header", "the scheme is not Basic or Bearer", "?")

    async def _check_password_file(self, protocol: str, address: str, username: str, password: bytes,
                                   key: bytes) -> Identity:
        if len(password) > MAX_PASSWORD_BYTES:
            # before any hashing: a long password costs nothing but its delay
            raise await self._fail(protocol, address, "too_long",
                                   f"password longer than {MAX_PASSWORD_BYTES} bytes", username)
        entry = self.passwords.get(username) if self.passwords is not None else None
        ok = await self._verify(entry if entry is not None else _DUMMY, password)
        if entry is None:
            raise await self._fail(protocol, address, "unknown_identity", "no such id in the password file",
                                   username)
        if not ok:
            raise await self._fail(protocol, address, "bad_password", "wrong password", username)
        return self._remember(key, username, "password", protocol, self.cache_s)

    async def _verify(self, entry: PasswordHash, password: bytes) -> bool:
        if entry.kind == 7 and entry.iterations > INLINE_ITERATIONS:
            return await trio.to_thread.run_sync(entry.verify, password, limiter=self._hash_limiter)
        return entry.verify(password)

    async def _check_jwt(self, protocol: str, address: str, token: str, client_id: str | None,
                         key: bytes) -> Identity:
        if self.jwt_keys is None:
            raise await self._fail(protocol, address, "bad_token", "no jwt_keys_file is configured", "?")
        try:
            name, exp = self.jwt_keys.verify(token, client_id)
        except JWTRejected as exc:
            reason = "unknown_identity" if exc.unknown else "bad_token"
            raise await self._fail(protocol, address, reason, exc.detail, client_id or "?") from None
        # cached no longer than the token lives (exp is wall-clock time)
        return self._remember(key, name, "jwt", protocol, exp - time.time())

    def certificate(self, protocol: str, stream: object) -> Identity | None:
        """The identity of the client certificate the TLS handshake of
        ``stream`` verified (its CN or first SAN, ``[tls] identity``); None
        when ``stream`` is not TLS or carries no verified certificate. A
        certificate comes before any user name and password (DESIGN section 10).
        A stream carried over another (MQTT over wss) names it ``transport``.
        Behind a load balancer that ended TLS, the CN of a client certificate
        it verified (a PROXY v2 SSL TLV from a trusted proxy, checked by the
        gateway) is the stream's ``proxy_certificate_cn``: the same identity
        when ``[tls] identity = "cn"`` (the proxy sends no SANs)."""
        name = _proxy_certificate_cn(stream) if self.certificate_mode == "cn" else None
        if name is None:
            if not isinstance(stream, trio.SSLStream):
                stream = getattr(stream, "transport", None)
                if not isinstance(stream, trio.SSLStream):
                    return None
            name = certificate_identity(stream, self.certificate_mode)
        if not name:
            return None
        if self.metrics is not None:
            self.metrics.auth_successes.labels(protocol, "certificate").inc()
        return Identity(name, "certificate")

    # -- reloading ------------------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Read the password file, JWT keys and ACL again (SIGHUP). All or
        nothing: with any problem the old set stays and the problems are
        returned, for the caller to log; else the new set replaces it and the
        cache of successful checks is emptied, so a removed or changed
        credential stops working at its next check. Bans and failure counts
        stay. Connections already open keep the topic grants they got at
        connect; ``still_valid`` says which may stay open."""
        passwords, jwt_keys, acl, problems = _load_stores(config)
        if problems:
            return problems
        self.passwords, self.jwt_keys, self.acl = passwords, jwt_keys, acl
        self.anonymous_allowed = config.auth.allow_anonymous or not config.has_credential_store
        self._cache.clear()
        return []

    def still_valid(self, identity: Identity | None) -> bool:
        """Whether a connection authenticated as ``identity`` may stay open
        after a reload: its id is still in the store that proved it (a
        certificate's validity is the TLS reload's to judge); an anonymous
        one while anonymous clients are served."""
        if identity is None or identity.method == "anonymous":
            return self.anonymous_allowed
        if identity.method == "password":
            return self.passwords is not None and identity.name in self.passwords.entries
        if identity.method == "jwt":
            return self.jwt_keys is not None and identity.name in self.jwt_keys.keys
        return True

    # -- authorization ------------------------------------------------------------------

    def may_use_client_id(self, identity: Identity | None, client_id: str) -> bool:
        """Whether ``identity`` may connect as device ``client_id``: its own
        id, or one the ACL lets it write for. Anonymous clients: any."""
        if identity is None or identity.name == client_id:
            return True
        return self.acl.may_write(identity.name, client_id, f"devices/{client_id}/telemetry")


def _load_stores(config: Config) -> tuple[PasswordFile | None, JWTKeys | None, ACL, list[str]]:
    """Read the password file, JWT keys and ACL of ``config``: every problem
    of every file, and what could be read."""
    auth = config.auth
    problems: list[str] = []
    passwords = jwt_keys = None
    acl = ACL()
    if auth.password_file:
        passwords, found = PasswordFile.load(auth.password_file)
        problems += found
    if auth.jwt_keys_file:
        jwt_keys, found = JWTKeys.load(auth.jwt_keys_file, auth.jwt_audience, auth.jwt_max_lifetime_s)
        problems += found
    if auth.acl_file:
        acl, found = ACL.load(auth.acl_file)
        problems += found
    return passwords, jwt_keys, acl, problems


def load_authenticator(config: Config, metrics: Metrics | None = None) -> Authenticator | None:
    """The Authenticator of ``config``: None when no credential store and no
    ACL is configured (every check is then skipped: the anonymous default).

    Raises:
        ConfigError: every problem of every file at once.
    """
    if not (config.has_credential_store or config.auth.acl_file):
        return None
    passwords, jwt_keys, acl, problems = _load_stores(config)
    if problems:
        raise ConfigError(problems)
    return Authenticator(config, passwords=passwords, jwt_keys=jwt_keys, acl=acl, metrics=metrics)
