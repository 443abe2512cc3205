"""HTTP ingest and admin endpoints against a real ``gridgate serve``, with
http.client, curl and raw sockets: every test runs against both engines
(fast: the compiled parser; std: h11)."""
from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import subprocess

import msgspec
import pytest

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_export, spool_stats
from rawclient import RawClient

READING = {"device_id": "meter-0001", "temperature": 77, "temperature_unit": "F", "location": "sh/fa"}


@pytest.fixture
def curl() -> str:
    """The curl binary (binaries.require: a skip here, a failure in CI); requested
    before ``gateway``, so a skip starts no gateway."""
    return require("curl")


@pytest.fixture(params=["fast", "std"], ids=["fast", "std"])
def gateway(request, tmp_path):
    gw = GatewayProcess(tmp_path / "data", "--http-engine", request.param,
                        env=gridgate_env(GRIDGATE_HTTP_HEADER_TIMEOUT_S="1", GRIDGATE_HTTP_BODY_TIMEOUT_S="1",
                                         GRIDGATE_HTTP_MAX_BODY_BYTES="65536"))
    yield gw
    gw.kill()


def request(gw, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*gw.http, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def post(gw, body, content_type="application/json", **headers):
    status, hdrs, data = request(gw, "POST", "/v1/telemetry", body, {"Content-Type": content_type, **headers})
    return status, hdrs, json.loads(data)


def test_single_reading_is_accepted_after_durable(gateway):
    status, _, body = post(gateway, json.dumps(READING))
    assert (status, body) == (202, {"accepted": 1, "rejected": 0, "errors": []})
    (rec,) = spool_export(gateway.data_dir)
    assert rec["fields"] == {"temperature_mc": 25000} and rec["protocol"] == "http"
    assert rec["tags"] == {"region": "sh", "site": "fa"}


def test_batch_with_bad_items_reports_each(gateway):
    batch = [READING, {"device_id": "m2", "humidity": 300}, {"humidity": 5}]
    status, _, body = post(gateway, json.dumps(batch))
    assert status == 202
    assert body == {"accepted": 1, "rejected": 2, "errors": [
        {"index": 1, "reason": "out_of_range", "field": "humidity", "detail": "value outside the allowed range"},
        {"index": 2, "reason": "missing_device_id", "field": "device_id", "detail": "device_id is required"}]}
    assert spool_stats(gateway.data_dir)["rejected"] == 2


def test_ndjson_msgpack_and_gzip(gateway):
    ndjson = "\n".join(json.dumps({**READING, "battery_mv": i}) for i in range(3)) + "\n"
    assert post(gateway, ndjson, "application/x-ndjson")[2]["accepted"] == 3
    assert post(gateway, msgspec.msgpack.encode([READING] * 2), "application/msgpack")[2]["accepted"] == 2
    zipped = gzip.compress(json.dumps([READING] * 4).encode())
    assert post(gateway, zipped, "application/json", **{"Content-Encoding": "gzip"})[2]["accepted"] == 4
    assert spool_stats(gateway.data_dir)["records"] == 9


@pytest.mark.parametrize("body, content_type, headers, status, error", [
    (b"{not json", "application/json", {}, 400, "malformed"),
    (b"5", "application/json", {}, 400, "not_object"),
    (b"x" * 70000, "application/json", {}, 413, "too_large"),
    (b"{}", "text/plain", {}, 415, "unsupported_media_type"),
    (b"{}", "application/json", {"Content-Encoding": "br"}, 415, "unsupported_encoding"),
    (b"\x1f\x8b\x08garbage", "application/json", {"Content-Encoding": "gzip"}, 400, "malformed"),
])
def test_error_statuses_have_json_bodies(gateway, body, content_type, headers, status, error):
    got_status, _, got = post(gateway, body, content_type, **headers)
    assert got_status == status
    assert got["error"] == error and isinstance(got["detail"], str)


def test_zip_bomb_gets_413_not_memory(gateway):
    bomb = gzip.compress(b"[" + b" " * 10_000_000 + b"]")   # 10 MB of nothing, ~10 kB on the wire
    status, _, body = post(gateway, bomb, "application/json", **{"Content-Encoding": "gzip"})
    assert (status, body["error"]) == (413, "too_large")


def test_admin_endpoints(gateway):
    mqtt = RawClient(gateway.mqtt)
    from mqtt_frames import gen_connack
    assert mqtt.connect("meter-42") == gen_connack(0)
    assert request(gateway, "GET", "/healthz")[0] == 200
    status, _, body = request(gateway, "GET", "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready", "sink": {"kind": "spool"}})
    status, _, body = request(gateway, "GET", "/v1/connections")
    conns = json.loads(body)
    assert conns["by_protocol"]["mqtt"] == 1 and conns["total"] == conns["by_protocol"]["mqtt"] + 1  # + this http
    status, _, body = request(gateway, "GET", "/v1/devices/meter-42")
    info = json.loads(body)
    assert status == 200 and info["online"] is True and info["protocol"] == "mqtt"
    assert set(info) == {"online", "device_id", "protocol", "connected_at", "last_seen", "remote"}
    mqtt.close()
    assert request(gateway, "GET", "/v1/devices/never-seen")[0] == 404
    status, headers, body = request(gateway, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b'gridgate_connections_opened_total{protocol="mqtt"} 1.0' in body
    status, headers, _ = request(gateway, "GET", "/v1/telemetry")
    assert status == 405 and headers["allow"] == "POST"
    assert request(gateway, "GET", "/nope")[0] == 404


def test_device_that_left_is_reported_offline(gateway):
    from mqtt_frames import gen_connack, gen_disconnect
    c = RawClient(gateway.mqtt)
    assert c.connect("meter-43") == gen_connack(0)
    c.send(gen_disconnect())
    assert c.closed_by_server()
    info = json.loads(request(gateway, "GET", "/v1/devices/meter-43")[2])
    assert info["online"] is False and info["protocol"] == "mqtt"


def _post_bytes(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _read_responses(sock: socket.socket, n: int) -> list[bytes]:
    data = b""
    while data.count(b"HTTP/1.1 ") < n or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]


def test_keep_alive_and_pipelining_answer_in_order(gateway):
    one = json.dumps(READING).encode()
    two = json.dumps([READING, READING]).encode()
    with socket.create_connection(gateway.http, timeout=10) as s:
        s.sendall(_post_bytes(one) + _post_bytes(two) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        responses = _read_responses(s, 3)
    assert [r[:13] for r in responses] == [b"HTTP/1.1 202 ", b"HTTP/1.1 202 ", b"HTTP/1.1 200 "]
    assert b'"accepted":1' in responses[0] and b'"accepted":2' in responses[1]


def test_expect_100_continue(gateway):
    body = json.dumps(READING).encode()
    with socket.create_connection(gateway.http, timeout=10) as s:
        s.sendall(_post_bytes(b"", b"Expect: 100-continue\r\n")[:-len(b"Content-Length: 0\r\n\r\n")]
                  + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        assert _read_responses(s, 1)[0].startswith(b"HTTP/1.1 202 ")


def _exchange(gw, raw: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(gw.http, timeout=10) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


HEAD = b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("raw, status, error", [
    (HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "bad_request"),
    (HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400, "bad_request"),
    (HEAD + b"Content-Length: 2, 2\r\n\r\n{}", 400, "bad_request"),
    (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
    (HEAD + b"X-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}", 400, "bad_request"),
    (HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "not_implemented"),
    (HEAD + b"Transfer-Encoding: gzip\r\n\r\n{}", 400, "bad_request"),              # chunked not last
    (HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    (HEAD + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"POST /v1/telemetry HTTP/2.0\r\nHost: x\r\n\r\n", 505, "version_not_supported"),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
])
def test_request_smuggling_and_bad_heads_are_refused(gateway, raw, status, error):
    reply = _exchange(gateway, raw)             # the server answers, then closes
    assert reply.startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == error
    assert spool_stats(gateway.data_dir)["records"] == 0


# Heads that are already invalid, and never finished: the client waits.
UNFINISHED = [
    (b"\n", 400),
    (b"\r\n" * 5, 400),
    (b"POST /v1/telemetry http/1.1", 400),
    (b"POST /v1/telemetry HTTP/3", 505),
    (b"POST /v1/telemetry HTTP/1.9", 505),
    (HEAD + b"Content-Length: 2\n", 400),
    (HEAD + b"Content-Length: 2\rX", 400),
    (HEAD + b"X-Folded: a\r\n b", 400),
    (HEAD + b"X-Ctl: a\x00b", 400),
    (HEAD + b"X-Bad : a", 400),
    (HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n", 400),
    (HEAD + b"Content-Length: 2, 2\r\n", 400),
    (HEAD + b"Content-Length: 99999999999999999999999\r\n", 413),
    (HEAD + b"Host: y\r\n", 400),
    (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", 400),
    (HEAD + b"Transfer-Encoding: chunked, gzip\r\n", 400),
    # a framing field's value that never ends is judged as far as it came
    (HEAD + b"Content-Length: 2\r\nContent-Length:", 400),
    (HEAD + b"Content-Length: 2,", 400),
    (HEAD + b"Content-Length: 2 3", 400),
    (HEAD + b"Content-Length: 99999999999999999999999", 413),
    (HEAD + b"Transfer-Encoding: chunked, g", 400),
    (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length:", 400),
    (HEAD + b"Host:", 400),
    (HEAD + b"Authorization: Basic eA==\r\nAuthorization: B", 400),
]


@pytest.mark.parametrize("raw, status", UNFINISHED, ids=[repr(r)[2:50] for r, _ in UNFINISHED])
def test_a_bad_head_is_answered_before_it_ends(gateway, raw, status):
    """Answered at the bad byte: a server that waited for the end of the head
    would close at header_timeout_s (1 s here) without a word."""
    with socket.create_connection(gateway.http, timeout=10) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 %d " % status)
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == {400: "bad_request", 413: "too_large",
                                                                   505: "version_not_supported"}[status]
    assert spool_stats(gateway.data_dir)["records"] == 0


def test_empty_lines_before_a_request_line_are_ignored(gateway):
    body = json.dumps(READING).encode()
    reply = _exchange(gateway, b"\r\n" + _post_bytes(body) + b"\r\n\r\n"
                      + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d+) ", reply) == [b"202", b"200"]
    assert spool_stats(gateway.data_dir)["records"] == 1


def _headers(head: bytes) -> dict[bytes, bytes]:
    lines = head.split(b"\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}


@pytest.mark.parametrize("method, path, status, allow", [
    (b"PUT", b"/v1/telemetry", 405, b"POST"),
    (b"HEAD", b"/v1/telemetry", 405, b"POST"),
    (b"DELETE", b"/healthz", 405, b"GET, HEAD"),
    (b"OPTIONS", b"/metrics", 405, b"GET, HEAD"),
    (b"PATCH", b"/v1/devices/m-1", 405, b"GET, HEAD"),
    (b"GET", b"/v1/devices/m-1/commands", 405, b"POST"),
    (b"FOO", b"/healthz", 501, None),                # a method no one registered
    (b"get", b"/healthz", 501, None),                # methods are case-sensitive
    (b"M!#$", b"/v1/telemetry", 501, None),
    (b"PUT", b"/nope", 501, None),                   # served on no resource: the method is the problem
    (b"GET", b"/nope", 404, None),
])
def test_a_method_not_served_gets_405_or_501(gateway, method, path, status, allow):
    """RFC 9110 9.1, 15.5.6, 15.6.2: any token is a method; never a parse error."""
    raw = (method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    head, _, body = _exchange(gateway, raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert _headers(head).get(b"allow") == allow
    if method == b"HEAD":
        assert body == b""
    else:
        errors = {404: "not_found", 405: "method_not_allowed", 501: "not_implemented"}
        assert json.loads(body)["error"] == errors[status]
    assert spool_stats(gateway.data_dir)["records"] == 0


@pytest.mark.parametrize("path", [b"/healthz", b"/v1/devices/never-seen", b"/nope"])
def test_head_is_answered_like_get_without_a_body(gateway, path):
    """RFC 9110 9.3.2: the same status and Content-Length, no body; the GET
    pipelined behind it is read from right after the HEAD's head."""
    get = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
    reply = _exchange(gateway, b"HEAD" + get[3:] + b"\r\n" + get + b"Connection: close\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    get_head, _, get_body = rest.partition(b"\r\n\r\n")
    assert get_head.startswith(b"HTTP/1.1 ") and head.split(b"\r\n")[0] == get_head.split(b"\r\n")[0]
    assert _headers(head)[b"content-length"] == _headers(get_head)[b"content-length"] == b"%d" % len(get_body)
    assert get_body


def test_chunked_body_is_accepted(gateway):
    body = json.dumps([READING, READING]).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10]) for i in range(0, len(body), 10))
    reply = _exchange(gateway, HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                      + chunked + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 202 ") and b'"accepted":2' in reply
    assert spool_stats(gateway.data_dir)["records"] == 2


def _chunked(body: bytes, size: bytes = b"%x", ext: bytes = b"", last: bytes = b"0", trailers: bytes = b"") -> bytes:
    return (size % len(body) + ext + b"\r\n" + body + b"\r\n" + last + b"\r\n" + trailers + b"\r\n")


@pytest.mark.parametrize("size, ext, last, trailers", [
    (b"%X", b"", b"000", b""),                                       # upper-case hex; 000 ends the body
    (b"00%x", b' ; a = b ; c="d \\" e"', b"0;f", b""),              # extensions: BWS, token, quoted-string
    (b"%x", b"", b"0", b"X-Checksum: 1\r\nX-Empty:\r\n"),             # trailers: parsed and ignored
])
def test_chunked_grammar_is_accepted(gateway, size, ext, last, trailers):
    body = json.dumps([READING, READING]).encode()
    reply = _exchange(gateway, HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                      + _chunked(body, size, ext, last, trailers))
    assert reply.startswith(b"HTTP/1.1 202 ") and b'"accepted":2' in reply
    assert spool_stats(gateway.data_dir)["records"] == 2


@pytest.mark.parametrize("size, ext, last, trailers", [
    (b"%x ", b"", b"0", b""),                                        # whitespace, no extension
    (b"%x", b";", b"0", b""),
    (b"%x", b";a=", b"0", b""),
    (b"%x", b';a="b', b"0", b""),
    (b"%x", b";a\rb", b"0", b""),                                    # bare CR
    (b"%x", b"", b"0\n", b""),                                        # bare LF
    (b"%x", b"", b"0", b" X: y\r\n"),                                 # obs-fold in a trailer
    (b"%x", b"", b"0", b"X: y\n"),
])
def test_chunked_grammar_is_refused(gateway, size, ext, last, trailers):
    body = json.dumps([READING]).encode()
    reply = _exchange(gateway, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, size, ext, last, trailers))
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request"
    assert spool_stats(gateway.data_dir)["records"] == 0


def test_post_without_a_length_gets_411(gateway):
    reply = _exchange(gateway, HEAD + b"Connection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411 ")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == "length_required"


def test_http10_and_connection_close_are_answered_then_closed(gateway):
    body = json.dumps(READING).encode()
    for version, extra in ((b"HTTP/1.0", b""), (b"HTTP/1.1", b"Connection: close\r\n")):
        raw = (b"POST /v1/telemetry " + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
               + b"Content-Length: %d\r\n\r\n" % len(body) + body + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _exchange(gateway, raw)         # returns: the server closed after one answer
        assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 202 ")
    assert spool_stats(gateway.data_dir)["records"] == 2


def test_slow_body_gets_408(gateway):
    with socket.create_connection(gateway.http, timeout=10) as s:
        s.sendall(HEAD + b"Content-Length: 10\r\n\r\n{")       # body_timeout_s is 1 s
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_slow_request_head_is_closed(gateway):
    with socket.create_connection(gateway.http, timeout=10) as s:
        s.sendall(b"POST /v1/telemetry HTTP/1.1\r\nHost: x\r\n")   # never finishes the head
        assert s.recv(1024) == b""                                   # closed after header_timeout_s (1 s)


def test_curl_posts_a_reading(curl, gateway):
    host, port = gateway.http
    out = subprocess.run([curl, "-sS", "-H", "Content-Type: application/json", "--data-binary",
                          json.dumps([READING] * 3), f"http://{host}:{port}/v1/telemetry"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"accepted": 3, "rejected": 0, "errors": []}


def test_metrics_parse_and_count_what_was_sent(gateway):
    from prometheus_client.parser import text_string_to_metric_families

    post(gateway, json.dumps([READING] * 4))                                     # 4 accepted
    post(gateway, json.dumps([READING, {"device_id": "m2", "humidity": 300}, {"humidity": 5}]))  # 1 + 2 rejected
    post(gateway, b"{not json")                                                  # whole body malformed
    _exchange(gateway, HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}")  # protocol error
    status, _, text = request(gateway, "GET", "/metrics")                        # the 5th connection
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("gridgate_readings_accepted_total", (("protocol", "http"),))] == 5
    rejected = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "gridgate_readings_rejected_total"}
    assert rejected == {"out_of_range": 1, "missing_device_id": 1, "malformed": 1}
    assert samples[("gridgate_protocol_errors_total", (("protocol", "http"), ("reason", "bad_request")))] == 1
    assert samples[("gridgate_connections_opened_total", (("protocol", "http"),))] == 5
    # each POST waited for its answer, so none shared a batch: three writes
    # (the malformed body's is its dead letter; the protocol error writes nothing)
    assert samples[("gridgate_batches_total", ())] == 3
    assert samples[("gridgate_sink_write_seconds_count", ())] == 3
    assert spool_stats(gateway.data_dir)["records"] == 5


def test_curl_large_body_with_expect_100_continue(curl, gateway):
    host, port = gateway.http
    body = json.dumps([{**READING, "battery_mv": i} for i in range(500)])      # ~40 kB, under the 64 kB limit
    out = subprocess.run([curl, "-sS", "-v", "-H", "Content-Type: application/json", "-H", "Expect: 100-continue",
                          "--data-binary", body, f"http://{host}:{port}/v1/telemetry"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "< HTTP/1.1 100" in out.stderr          # h11 sends no reason phrase
    assert json.loads(out.stdout)["accepted"] == 500
