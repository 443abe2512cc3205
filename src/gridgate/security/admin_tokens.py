"""Admin API tokens (DESIGN section 10): ``[admin] tokens_file``.

The file holds only SHA-256 digests, never a token::

    [[token]]
    name = "ops-oncall"
    sha256 = "9f86d08..."          # hex digest of the token
    scopes = ["devices:read", "commands:write"]

``gridgate admin-token NAME --scope S...`` makes a token, prints it once and
the entry to add. A request presents ``Authorization: Bearer <token>``; the
digest of what it presents is looked up, so comparing costs the same whatever
the guess, and a stolen file opens nothing. Device credentials never open
the admin API: these tokens are a separate store.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import tomllib
from dataclasses import dataclass
from typing import Any

__all__ = ["SCOPES", "AdminGate", "AdminToken", "AdminTokens", "new_token", "entry_toml"]

# What each scope opens (the routes are in protocols/http/api.py).
SCOPES = {
    "devices:read": "GET /v1/devices/{id}, GET /v1/connections, GET /v1/bans",
    "commands:write": "POST /v1/devices/{id}/commands",
    "bans:write": "GET /v1/bans, DELETE /v1/bans/{kind}/{key}",
}
TOKEN_PREFIX = "ggadm_"
# A token is the prefix and 43 URL-safe characters (32 random bytes); a
# longer Authorization value is refused before hashing.
MAX_TOKEN_CHARS = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    scopes: frozenset[str]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class AdminTokens:
    """The tokens of one ``tokens_file`` (empty: no token opens anything)."""

    def __init__(self, by_digest: dict[str, AdminToken]) -> None:
        self._by_digest = by_digest

    def __len__(self) -> int:
        return len(self._by_digest)

    def names(self) -> list[str]:
        return sorted(t.name for t in self._by_digest.values())

    def check(self, authorization: str) -> AdminToken | None:
        """The token an ``Authorization`` header value presents, if known."""
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            return None
        return self._by_digest.get(_digest(token))

    @classmethod
    def parse(cls, text: str, source: str) -> tuple[AdminTokens, list[str]]:
        """The tokens in ``text``, and every problem found (with ``source``)."""
        problems: list[str] = []
        try:
            data: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            return cls({}), [f"{source}: {exc}"]
        unknown = set(data) - {"token"}
        if unknown:
            problems.append(f"{source}: unknown key(s) {', '.join(sorted(unknown))} (entries are [[token]] tables)")
        entries = data.get("token", [])
        if not isinstance(entries, list):
            return cls({}), [*problems, f"{source}: token must be an array of tables ([[token]])"]
        by_digest: dict[str, AdminToken] = {}
        names: set[str] = set()
        for n, entry in enumerate(entries, 1):
            where = f"{source}: token #{n}"
            if not isinstance(entry, dict):
                problems.append(f"{where}: not a table")
                continue
            extra = set(entry) - {"name", "sha256", "scopes"}
            if extra:
                problems.append(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                problems.append(f"{where}: name must be 1-64 of A-Z a-z 0-9 _ . @ - (got {name!r})")
                continue
            where = f"{source}: token {name!r}"
            if name in names:
                problems.append(f"{where}: the name is used twice")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                # never echo the value: it could be a token pasted by mistake
                problems.append(f"{where}: sha256 must be 64 lower-case hex digits (the digest, not the token)")
                continue
            if (not isinstance(scopes, list) or not scopes
                    or not all(isinstance(s, str) and s in SCOPES for s in scopes)):
                problems.append(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
                continue
            if digest in by_digest:
                problems.append(f"{where}: the same token as {by_digest[digest].name!r}")
            names.add(name)
            by_digest[digest] = AdminToken(name, frozenset(scopes))
        return cls(by_digest), problems

    @classmethod
    def load(cls, path: str) -> tuple[AdminTokens, list[str]]:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            return cls({}), [f"admin.tokens_file {path!r}: {exc}"]
        return cls.parse(text, f"admin.tokens_file {path!r}")


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe, with a prefix that secret
    scanners and people can recognise."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def entry_toml(name: str, token: str, scopes: list[str]) -> str:
    """The ``[[token]]`` entry for ``token`` (its digest only)."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"name must be 1-64 of A-Z a-z 0-9 _ . @ - (got {name!r})")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"unknown scope(s) {', '.join(bad)}; known: {', '.join(SCOPES)}" if bad
                         else f"at least one --scope is needed: {', '.join(SCOPES)}")
    quoted = ", ".join(f'"{s}"' for s in dict.fromkeys(scopes))
    return f'[[token]]\nname = "{name}"\nsha256 = "{_digest(token)}"\nscopes = [{quoted}]\n'


class AdminGate:
    """Who may use the admin API. ``required`` (DESIGN section 10): whenever a
    credential store or a tokens file is configured, or a listener binds a
    non-loopback address; then only a known token with the route's scope
    opens it (no tokens file: nothing does). Otherwise it is open, as on a
    development machine."""

    def __init__(self, tokens: AdminTokens, *, required: bool, metrics_token_required: bool = False) -> None:
        self.tokens = tokens
        self.required = required
        self.metrics_token_required = metrics_token_required

    def check(self, authorization: str, scopes: tuple[str, ...]) -> tuple[int, str, str] | None:
        """None when the request may go on, else (status, error, detail);
        ``scopes``: any of them opens the route (empty: any known token)."""
        if not self.required:
            return None
        token = self.tokens.check(authorization) if authorization else None
        if token is None:
            return 401, "unauthorized", "the admin API needs Authorization: Bearer <admin token>"
        if scopes and not token.scopes.intersection(scopes):
            return 403, "forbidden", f"admin token {token.name!r} lacks the scope {' or '.join(scopes)}"
        return None
