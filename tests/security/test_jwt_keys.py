"""JWT verification: the algorithm from the key, aud, exp, bounded lifetime, rotation."""
from __future__ import annotations

import json
import time

import pytest

from gridgate.security.jwt_keys import MAX_TOKEN_BYTES, JWTKeys, JWTRejected, looks_like_jwt
from security.jwt_helpers import hs256_token, make_key, public_pem, token, unsigned_token


@pytest.fixture(scope="module")
def keys():
    return {alg: make_key(alg) for alg in ("ES256", "RS256", "EdDSA")}


def _store(mapping, audience="gridgate", lifetime=86_400) -> JWTKeys:
    store, problems = JWTKeys.parse(mapping, "keys", audience, lifetime)
    assert problems == []
    return store


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_each_algorithm_verifies_with_its_key(keys, alg):
    store = _store({"meter-1": public_pem(keys[alg])})
    tok = token(keys[alg], alg)
    assert looks_like_jwt(tok) and looks_like_jwt(tok.encode())
    identity, exp = store.verify(tok)
    assert identity == "meter-1" and exp > time.time()


def test_rotation_any_key_of_the_id(keys):
    old, new = make_key("ES256"), make_key("ES256")
    store = _store({"meter-1": [public_pem(old), public_pem(new), public_pem(keys["RS256"])]})
    assert store.verify(token(old, "ES256"))[0] == "meter-1"
    assert store.verify(token(new, "ES256"))[0] == "meter-1"
    assert store.verify(token(keys["RS256"], "RS256"))[0] == "meter-1"
    with pytest.raises(JWTRejected, match="signature"):
        store.verify(token(make_key("ES256"), "ES256"))


def test_the_client_id_stands_in_for_a_missing_sub(keys):
    store = _store({"meter-2": public_pem(keys["EdDSA"])})
    assert store.verify(token(keys["EdDSA"], "EdDSA", sub=None), "meter-2")[0] == "meter-2"
    with pytest.raises(JWTRejected, match="no sub"):
        store.verify(token(keys["EdDSA"], "EdDSA", sub=None))
    # a sub names the identity, whatever the client id
    with pytest.raises(JWTRejected) as info:
        store.verify(token(keys["EdDSA"], "EdDSA", sub="meter-1"), "meter-2")
    assert info.value.unknown


@pytest.mark.parametrize("case", ["wrong_aud", "expired", "other_key", "alg_none", "hs256_confusion",
                                  "too_long_lifetime", "no_iat", "no_exp", "unknown_id", "oversized", "garbage",
                                  "alg_mismatch"])
def test_refused_tokens(keys, case):
    es = keys["ES256"]
    pem = public_pem(keys["RS256"])
    store = _store({"meter-1": [public_pem(es), pem]}, lifetime=3600)
    tok = {
        "wrong_aud": lambda: token(es, "ES256", aud="someone-else"),
        "expired": lambda: token(es, "ES256", iat=time.time() - 1000, lifetime=500),
        "other_key": lambda: token(make_key("ES256"), "ES256"),
        "alg_none": lambda: unsigned_token(),
        "hs256_confusion": lambda: hs256_token(pem.encode()),
        "too_long_lifetime": lambda: token(es, "ES256", lifetime=3601),
        "no_iat": lambda: _without(es, "iat"),
        "no_exp": lambda: _without(es, "exp"),
        "unknown_id": lambda: token(es, "ES256", sub="meter-9"),
        "oversized": lambda: token(es, "ES256", pad="x" * MAX_TOKEN_BYTES),
        "garbage": lambda: "eyJhbGciOi.not.a-token",
        # an EdDSA-signed token for an id whose keys are EC and RSA
        "alg_mismatch": lambda: token(keys["EdDSA"], "EdDSA"),
    }[case]()
    with pytest.raises(JWTRejected) as info:
        store.verify(tok)
    assert info.value.unknown is (case == "unknown_id")
    assert tok not in str(info.value)


def _without(private, claim: str) -> str:
    import jwt
    now = int(time.time())
    claims = {"sub": "meter-1", "aud": "gridgate", "iat": now, "exp": now + 60}
    del claims[claim]
    return jwt.encode(claims, private, algorithm="ES256")


def test_key_file_problems_all_at_once(tmp_path):
    weak_rsa = "-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMEBlq7YqFx1qE6m6o+MQz4ZpN9C1o2n\n" \
               "vYq3m8lH2cM8U4QHk6c8JdJ7q8E5tqAqS5v6t3o8h0s3D3m7Q3ZxO2sCAwEAAQ==\n-----END PUBLIC KEY-----\n"
    from cryptography.hazmat.primitives.asymmetric import ec
    p384 = public_pem(ec.generate_private_key(ec.SECP384R1()))
    good = public_pem(make_key("EdDSA"))
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"a": "not a pem", "b": [good, p384], "c": [], "d": weak_rsa, "e": good}))
    store, problems = JWTKeys.load(str(path), "gridgate", 60)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "'a'" in text and "P-256" in text and "'c'" in text and "'d'" in problems[3]
    assert set(store.keys) == {"b", "e"}
    toml = tmp_path / "keys.toml"
    toml.write_text(f'"meter-1" = """{good}"""\n')
    store, problems = JWTKeys.load(str(toml), "gridgate", 60)
    assert problems == [] and set(store.keys) == {"meter-1"}
    toml.write_text("= broken")
    assert "not valid TOML" in JWTKeys.load(str(toml), "gridgate", 60)[1][0]
