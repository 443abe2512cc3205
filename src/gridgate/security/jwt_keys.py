"""JWTs signed by a device's own private key (DESIGN section 10).

``[auth] jwt_keys_file`` (TOML or JSON) maps an id to the PEM public key(s)
its tokens are signed with: ``{"meter-1": "-----BEGIN PUBLIC KEY-----..."}``
or a list of them (rotation: a token verifies if any key of its id does).

The algorithm comes from the key, never from the token: an EC P-256 key
verifies ES256 only, an RSA key (2048 bits or more) RS256 only, an Ed25519
key EdDSA only. So ``alg: none`` and HS256 (an RSA public key abused as an
HMAC secret) never verify. A token must carry ``aud`` equal to
``[auth] jwt_audience``, ``exp`` and ``iat``, with ``exp - iat`` at most
``jwt_max_lifetime_s``; its identity is ``sub`` (over MQTT the client id may
stand in for a missing ``sub``). Cheap refusals come first: the size bound,
the shape, the header's algorithm, and a known id, before any signature.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["JWTKeys", "JWTRejected", "MAX_TOKEN_BYTES", "looks_like_jwt"]

# Larger tokens are refused unread (a compact ES256/EdDSA token is ~300
# bytes, an RS256 one with a 4096-bit key ~900).
MAX_TOKEN_BYTES = 8192
MIN_RSA_BITS = 2048
_ALLOWED = frozenset({"ES256", "RS256", "EdDSA"})
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def looks_like_jwt(secret: bytes | str) -> bool:
    """Three base64url segments joined by dots, a JSON header first: what to
    try as a token rather than as a password."""
    text = secret.decode("ascii", "replace") if isinstance(secret, bytes) else secret
    parts = text.split(".")
    return len(parts) == 3 and text.startswith("eyJ") and all(parts[:2]) and \
        all(_B64URL.issuperset(p) for p in parts)


class JWTRejected(Exception):
    """A token that does not verify. ``unknown`` when no key is known for its
    id; ``detail`` says why for the logs, without the token."""

    def __init__(self, detail: str, unknown: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.unknown = unknown


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any            # a cryptography public key object
    algorithm: str


def _key_problem(pem: str) -> _Key | str:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError) as exc:
        return f"not a PEM public key ({exc})"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            return f"an EC key must be on P-256 (ES256), not {key.curve.name}"
        return _Key(key, "ES256")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"an RSA key must have at least {MIN_RSA_BITS} bits, not {key.key_size}"
        return _Key(key, "RS256")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return _Key(key, "EdDSA")
    return f"{type(key).__name__} is not an ES256 (P-256), RS256 or EdDSA (Ed25519) key"


class JWTKeys:
    """The public keys of every id, and the rules a token must meet."""

    __slots__ = ("keys", "audience", "max_lifetime_s")

    def __init__(self, keys: dict[str, list[_Key]], audience: str, max_lifetime_s: int) -> None:
        self.keys = keys
        self.audience = audience
        self.max_lifetime_s = max_lifetime_s

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def parse(cls, data: object, source: str, audience: str, max_lifetime_s: int) -> tuple[JWTKeys, list[str]]:
        keys: dict[str, list[_Key]] = {}
        problems: list[str] = []
        if not isinstance(data, dict):
            return cls({}, audience, max_lifetime_s), [f"{source}: must map ids to PEM public keys"]
        for identity, value in data.items():
            pems = value if isinstance(value, list) else [value]
            if not identity or not pems or not all(isinstance(p, str) for p in pems):
                problems.append(f"{source}: id {identity!r}: give a PEM public key or a non-empty list of them")
                continue
            found: list[_Key] = []
            for n, pem in enumerate(pems, 1):
                key = _key_problem(pem)
                if isinstance(key, str):
                    problems.append(f"{source}: id {identity!r}, key {n}: {key}")
                else:
                    found.append(key)
            if found:
                keys[identity] = found
        return cls(keys, audience, max_lifetime_s), problems

    @classmethod
    def load(cls, path: str, audience: str, max_lifetime_s: int) -> tuple[JWTKeys, list[str]]:
        """Read a TOML file, or JSON when it ends in ``.json``."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
            data = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode("utf-8"))
        except OSError as exc:
            return cls({}, audience, max_lifetime_s), [f"auth.jwt_keys_file {path}: cannot read it: {exc}"]
        except (ValueError, UnicodeDecodeError) as exc:     # JSONDecodeError and TOMLDecodeError are ValueErrors
            return cls({}, audience, max_lifetime_s), [f"auth.jwt_keys_file {path}: not valid "
                                                      f"{'JSON' if path.endswith('.json') else 'TOML'}: {exc}"]
        return cls.parse(data, f"auth.jwt_keys_file {path}", audience, max_lifetime_s)

    def verify(self, token: str, fallback_id: str | None = None) -> tuple[str, float]:
        """The identity ``token`` proves (its ``sub``, or ``fallback_id``, the
        MQTT client id, when it has none) and its ``exp`` (epoch seconds).

        Raises:
            JWTRejected: the token does not verify, for any reason.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise JWTRejected(f"token longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise JWTRejected(f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in _ALLOWED:
            raise JWTRejected(f"algorithm {str(alg)[:20]!r} is not ES256, RS256 or EdDSA")
        sub = claims.get("sub")
        if sub is not None and (not isinstance(sub, str) or not sub):
            raise JWTRejected("sub is not a non-empty string")
        identity = sub if sub is not None else fallback_id
        if identity is None:
            raise JWTRejected("no sub")
        keys = self.keys.get(identity)
        if not keys:
            raise JWTRejected("no key for this id", unknown=True)
        last = "no key of this id uses the token's algorithm"
        for key in keys:
            if key.algorithm != alg:
                continue
            try:
                verified = jwt.decode(token, key.key, algorithms=[key.algorithm], audience=self.audience,
                                      options={"require": ["exp", "iat", "aud"], "verify_iat": True})
            except jwt.InvalidSignatureError:
                last = "signature does not verify with any key of this id"
                continue
            except jwt.PyJWTError as exc:
                raise JWTRejected(str(exc)) from None
            return identity, self._lifetime_checked(verified)
        raise JWTRejected(last)

    def _lifetime_checked(self, claims: dict[str, Any]) -> float:
        exp, iat = claims["exp"], claims["iat"]
        # PyJWT has checked both are numbers; bools are ints in Python
        if isinstance(exp, bool) or isinstance(iat, bool) or exp - iat > self.max_lifetime_s:
            raise JWTRejected(f"exp - iat exceeds jwt_max_lifetime_s {self.max_lifetime_s}")
        if exp <= iat:
            raise JWTRejected("exp is not after iat")
        return float(exp)

