"""The Authenticator: delays, bans, the cache, bounded tables, loading.

Every test runs under pytest-trio's ``autojump_clock`` (a MockClock with
autojump_threshold=0): the failure delay and ban expiry are exact, and no
test sleeps for real.
"""
from __future__ import annotations

import base64

import pytest
import trio

from gridgate.config import AuthConfig, Config, ConfigError, ServiceConfig
from gridgate.observability.metrics import Metrics
from gridgate.security import authenticator as auth_mod
from gridgate.security.authenticator import Authenticator, AuthFailure, Identity, load_authenticator, source_address
from gridgate.security.jwt_keys import JWTKeys
from gridgate.security.passwords import PasswordFile, format_line, hash_password
from security.jwt_helpers import make_key, public_pem, token


def _config(**auth) -> Config:
    return Config(service=ServiceConfig(environment="t", service_name="t"),
                  auth=AuthConfig(password_file="pw", **auth))


def _auth(metrics=None, **auth) -> Authenticator:
    text = format_line("meter-1", hash_password(b"right")) + format_line("meter-2", hash_password(b"two"))
    passwords, problems = PasswordFile.parse(text, "pw")
    assert problems == []
    return Authenticator(_config(**auth), passwords=passwords, metrics=metrics)


def _value(metrics: Metrics, name: str, **labels) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_source_address():
    assert source_address("10.0.0.7:5555") == "10.0.0.7"
    assert source_address("[::1]:5555") == "::1"
    assert source_address("MemoryStream") == "MemoryStream"


async def test_success_then_cached(autojump_clock):
    metrics = Metrics()
    auth = _auth(metrics)
    assert await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"right") == Identity("meter-1", "password")
    assert await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"right") == Identity("meter-1", "password")
    assert _value(metrics, "gridgate_auth_cache_hits_total", protocol="mqtt") == 1
    assert _value(metrics, "gridgate_auth_successes_total", protocol="mqtt", method="password") == 2
    # the cache holds hashes, never the password
    assert all(b"right" not in key for key in auth._cache)
    # the cache does not outlive cache_s
    await trio.sleep(auth.cache_s + 1)
    await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"right")
    assert _value(metrics, "gridgate_auth_cache_hits_total", protocol="mqtt") == 1


@pytest.mark.parametrize("user, password, reason", [
    ("meter-1", b"wrong", "bad_password"),
    ("meter-9", b"right", "unknown_identity"),
    ("meter-1", b"x" * 65_535, "too_long"),
])
async def test_failures_wait_the_delay_and_say_why(autojump_clock, user, password, reason):
    metrics = Metrics()
    auth = _auth(metrics, failure_delay_ms=1500)
    start = trio.current_time()
    with pytest.raises(AuthFailure) as info:
        await auth.check_password("mqtt", "10.0.0.1", user, password)
    assert info.value.reason == reason
    assert trio.current_time() - start == pytest.approx(1.5)
    assert _value(metrics, "gridgate_auth_failures_total", protocol="mqtt", reason=reason) == 1
    # a failure is never cached: the right password still works, the wrong one still fails
    if reason == "bad_password":
        assert (await auth.check_password("mqtt", "10.0.0.1", user, b"right")).name == user


async def test_ban_after_repeated_failures_then_expiry(autojump_clock):
    metrics = Metrics()
    auth = _auth(metrics, failures_before_ban=3, failure_window_s=60, ban_s=300, failure_delay_ms=1000)
    for _ in range(3):
        with pytest.raises(AuthFailure):
            await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"wrong")
    assert auth.is_banned("10.0.0.1") and not auth.is_banned("10.0.0.2")
    assert _value(metrics, "gridgate_auth_bans_total") == 1
    # banned: refused at once, before any hashing, even with the right password
    start = trio.current_time()
    with pytest.raises(AuthFailure) as info:
        await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"right")
    assert info.value.reason == "banned" and trio.current_time() == start
    assert _value(metrics, "gridgate_auth_banned_connections_total", protocol="mqtt") == 1
    # another address is served meanwhile
    assert (await auth.check_password("mqtt", "10.0.0.2", "meter-1", b"right")).name == "meter-1"
    await trio.sleep(300)
    assert not auth.is_banned("10.0.0.1")
    assert (await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"right")).name == "meter-1"


async def test_failures_outside_the_window_do_not_add_up(autojump_clock):
    auth = _auth(failures_before_ban=3, failure_window_s=10, failure_delay_ms=0)
    for _ in range(5):
        for _ in range(2):
            with pytest.raises(AuthFailure):
                await auth.check_password("mqtt", "10.0.0.1", "meter-1", b"wrong")
        await trio.sleep(11)
    assert not auth.is_banned("10.0.0.1")


async def test_1000_failures_from_one_address_ban_it_and_cost_no_hashing_after(autojump_clock, monkeypatch):
    auth = _auth(failures_before_ban=10, failure_delay_ms=1000)
    hashed = 0
    verify = auth_mod.Authenticator._verify

    async def counting(self, entry, password):
        nonlocal hashed
        hashed += 1
        return await verify(self, entry, password)
    monkeypatch.setattr(auth_mod.Authenticator, "_verify", counting)
    reasons: list[str] = []

    async def attempt(i: int) -> None:
        try:
            await auth.check_password("mqtt", "10.0.0.66", "meter-1", b"guess%d" % i)
        except AuthFailure as exc:
            reasons.append(exc.reason)
    for i in range(1000):
        await attempt(i)
    assert reasons.count("banned") == 990 and reasons[:10] == ["bad_password"] * 10
    assert hashed == 10
    assert (await auth.check_password("mqtt", "10.0.0.7", "meter-2", b"two")).name == "meter-2"


async def test_tables_are_bounded(autojump_clock, monkeypatch):
    monkeypatch.setattr(auth_mod, "FAILURES_MAX", 100)
    monkeypatch.setattr(auth_mod, "BANS_MAX", 50)
    monkeypatch.setattr(auth_mod, "CACHE_MAX", 20)
    auth = _auth(failures_before_ban=2, failure_delay_ms=0)
    for i in range(1000):
        with pytest.raises(AuthFailure):
            await auth.check_password("mqtt", f"10.1.{i // 256}.{i % 256}", "meter-1", b"wrong")
        if i % 3 == 0:       # every third address fails twice: banned
            with pytest.raises(AuthFailure):
                await auth.check_password("mqtt", f"10.1.{i // 256}.{i % 256}", "meter-1", b"wrong")
    assert len(auth._failures) <= 100 and len(auth._bans) <= 50
    for i in range(200):
        auth._remember(auth.credentials_key(b"k", str(i)), "meter-1", "password", "mqtt", 300)
    assert len(auth._cache) <= 20


async def test_http_authorization_header(autojump_clock):
    keys = make_key("ES256")
    store, problems = JWTKeys.parse({"meter-3": public_pem(keys)}, "k", "gridgate", 86_400)
    assert problems == []
    base = _auth(failure_delay_ms=0)
    auth = Authenticator(_config(failure_delay_ms=0), passwords=base.passwords, jwt_keys=store)
    basic = "Basic " + base64.b64encode(b"meter-1:right").decode()
    assert await auth.check_authorization("http", "a", basic) == Identity("meter-1", "password")
    assert await auth.check_authorization("http", "a", "Bearer " + token(keys, "ES256", sub="meter-3")) == \
        Identity("meter-3", "jwt")
    # the same token as an MQTT password, without sub: the client id is the identity
    assert await auth.check_password("mqtt", "a", "ignored", token(keys, "ES256", sub=None).encode(),
                                     "meter-3") == Identity("meter-3", "jwt")
    for header, reason in [("", "no_credentials"), ("Digest abc", "bad_header"), ("Basic !!!", "bad_header"),
                           ("Basic " + base64.b64encode(b"nocolon").decode(), "bad_header"),
                           ("Bearer abc.def.ghi", "bad_token"),
                           ("Basic " + base64.b64encode(b"meter-1:wrong").decode(), "bad_password")]:
        with pytest.raises(AuthFailure) as info:
            await auth.check_authorization("http", "a", header)
        assert info.value.reason == reason, header
    anon = Authenticator(_config(allow_anonymous=True), passwords=base.passwords)
    assert await anon.check_authorization("http", "a", "") is None


async def test_costly_hashes_run_off_the_event_loop(autojump_clock, monkeypatch):
    text = format_line("meter-1", hash_password(b"right", iterations=auth_mod.INLINE_ITERATIONS + 1))
    passwords, _ = PasswordFile.parse(text, "pw")
    auth = Authenticator(_config(failure_delay_ms=0), passwords=passwords)
    threads = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        threads.append(fn)
        return await run_sync(fn, *args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    assert (await auth.check_password("mqtt", "a", "meter-1", b"right")).name == "meter-1"
    with pytest.raises(AuthFailure):
        await auth.check_password("mqtt", "a", "meter-1", b"wrong")
    assert len(threads) == 2
    # a cheap entry is hashed inline
    assert (await _auth(failure_delay_ms=0).check_password("mqtt", "a", "meter-1", b"right")).name == "meter-1"
    assert len(threads) == 2


def test_may_use_client_id():
    auth = _auth()
    assert auth.may_use_client_id(None, "anything")
    assert auth.may_use_client_id(Identity("meter-1", "password"), "meter-1")
    assert not auth.may_use_client_id(Identity("meter-1", "password"), "meter-2")


def test_loading_reports_every_problem_of_every_file(tmp_path):
    (tmp_path / "pw").write_text("bad line\nmeter-1:$9$x\n")
    (tmp_path / "acl").write_text("topic sometimes a\n")
    config = Config(service=ServiceConfig(environment="t", service_name="t"),
                    auth=AuthConfig(password_file=str(tmp_path / "pw"), jwt_keys_file=str(tmp_path / "none.json"),
                                    acl_file=str(tmp_path / "acl")))
    with pytest.raises(ConfigError) as info:
        load_authenticator(config)
    assert len(info.value.problems) == 4
    assert load_authenticator(Config(service=ServiceConfig(environment="t", service_name="t"))) is None


async def test_reload_swaps_all_or_nothing_and_empties_the_cache(autojump_clock, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(format_line("meter-1", hash_password(b"one")) + format_line("meter-2", hash_password(b"two")))
    acl = tmp_path / "acl"
    acl.write_text("pattern write devices/%u/telemetry\n")
    config = Config(service=ServiceConfig(environment="t", service_name="t"),
                    auth=AuthConfig(password_file=str(pw), acl_file=str(acl), failure_delay_ms=0))
    auth = load_authenticator(config)
    one = await auth.check_password("mqtt", "a", "meter-1", b"one")
    assert auth.still_valid(one) and auth.acl.may_write_device("meter-1", "meter-1")
    # a broken file: every problem said, the old set kept
    pw.write_text("garbage\n")
    acl.write_text("topic sometimes x\n")
    assert len(auth.reload(config)) == 2
    assert (await auth.check_password("mqtt", "a", "meter-2", b"two")).name == "meter-2"
    # meter-1 removed, meter-2's password changed, the ACL narrowed: effective at once, cache or not
    pw.write_text(format_line("meter-2", hash_password(b"new")))
    acl.write_text("user meter-2\ntopic write devices/meter-2/telemetry\n")
    assert auth.reload(config) == []
    assert not auth.still_valid(one)
    assert auth.still_valid(Identity("meter-2", "password"))
    for user, password in [("meter-1", b"one"), ("meter-2", b"two")]:
        with pytest.raises(AuthFailure):
            await auth.check_password("mqtt", "a", user, password)
    assert (await auth.check_password("mqtt", "a", "meter-2", b"new")).name == "meter-2"
    assert not auth.acl.may_write_device("meter-1", "meter-1") and auth.acl.may_write_device("meter-2", "meter-2")
    assert auth.still_valid(Identity("meter-9", "certificate"))
    assert not auth.still_valid(None)               # anonymous clients are not served with a store
