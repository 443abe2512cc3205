"""Keys and tokens for the JWT tests (real keys, real signatures)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["make_key", "public_pem", "token", "unsigned_token", "hs256_token"]


def make_key(kind: str) -> Any:
    if kind == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_pem(private: Any) -> str:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def token(private: Any, alg: str, sub: str | None = "meter-1", aud: str = "gridgate", lifetime: float = 600,
          iat: float | None = None, **extra: Any) -> str:
    now = time.time() if iat is None else iat
    claims: dict[str, Any] = {"aud": aud, "iat": int(now), "exp": int(now + lifetime), **extra}
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, private, algorithm=alg)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sub: str) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "aud": "gridgate", "iat": now, "exp": now + 600}


def unsigned_token(sub: str = "meter-1") -> str:
    """``alg: none``: no signature at all."""
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(_claims(sub)).encode())}."


def hs256_token(secret: bytes, sub: str = "meter-1") -> str:
    """HS256 with ``secret`` (the key confusion attack: the public PEM as HMAC secret)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims(sub)).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"
