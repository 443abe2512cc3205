"""The sans-IO PROXY protocol parser: every header whole and byte by byte,
every refusal with its reason, ``header_part`` never past the header's end,
and hypothesis over arbitrary bytes and splits."""
from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gridgate.protocols.proxy_protocol import (
    NEED_DATA,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_SSL,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PROXY_ERROR_REASONS,
    V1_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    SSLInfo,
    crc32c,
)
from proxy_headers import ssl_tlv, tlv, v1, v2

SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def parse(version: int, data: bytes, **kw) -> tuple[ProxyHeader, bytes]:
    """``data`` fed whole, then byte by byte: the same header, the same trailing bytes."""
    whole = ProxyHeaderParser(version, **kw)
    whole.receive_data(data)
    result = whole.next_event()
    byte_wise = ProxyHeaderParser(version, **kw)
    for i in range(len(data)):
        if byte_wise.next_event() is not NEED_DATA:
            break
        byte_wise.receive_data(data[i:i + 1])
    assert byte_wise.next_event() == result
    assert isinstance(result, ProxyHeader)
    return result, whole.trailing


def refused(version: int, data: bytes, **kw) -> ProxyProtocolError:
    """The error for ``data`` fed whole; byte by byte: NEED_DATA until the same error."""
    whole = ProxyHeaderParser(version, **kw)
    whole.receive_data(data)
    with pytest.raises(ProxyProtocolError) as caught:
        whole.next_event()
    byte_wise = ProxyHeaderParser(version, **kw)
    for i in range(len(data)):
        byte_wise.receive_data(data[i:i + 1])
        try:
            assert byte_wise.next_event() is NEED_DATA
        except ProxyProtocolError as exc:
            assert (exc.reason, exc.detail) == (caught.value.reason, caught.value.detail)
            break
    else:
        pytest.fail("byte by byte never refused")
    # sticky: more bytes never make it valid
    with pytest.raises(ProxyProtocolError):
        whole.receive_data(b"\r\n")
        whole.next_event()
    assert caught.value.reason in PROXY_ERROR_REASONS
    return caught.value


# -- v1 -----------------------------------------------------------------------------------------

def test_v1_tcp4_and_the_bytes_after_it():
    header, rest = parse(1, b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n\x10\x0c")
    assert header == ProxyHeader(1, "proxy", "inet", "stream", ("192.0.2.7", 56324), ("10.0.0.1", 1883), 42)
    assert header.client_address == ("192.0.2.7", 56324)
    assert rest == b"\x10\x0c"


def test_v1_tcp6():
    header, _ = parse(1, v1("2001:db8::7", "2001:db8::1", 65535, 0))
    assert header.source == ("2001:db8::7", 65535) and header.destination == ("2001:db8::1", 0)
    assert header.family == "inet6"


def test_an_ipv4_mapped_source_is_the_ipv4_client():
    for data, version in ((v1("::ffff:192.0.2.7", "::ffff:10.0.0.1", 1, 2), 1),
                          (v2("::ffff:192.0.2.7", "::1", 1, 2), 2)):
        header, _ = parse(version, data)
        assert header.source == (str(ipaddress.IPv6Address("::ffff:192.0.2.7")), 1)
        assert header.client_address == ("192.0.2.7", 1)


def test_v1_unknown_keeps_the_proxy_address():
    header, rest = parse(1, b"PROXY UNKNOWN ffff::1 anything at all\r\nGET")
    assert header.family == "unspec" and header.client_address is None and rest == b"GET"


def test_v1_longest_line_is_107_bytes():
    line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(line) == V1_MAX_BYTES - 3
    header, _ = parse(1, line)
    assert header.length == len(line)
    # UNKNOWN may carry anything up to the bound, not one byte more
    parse(1, b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n")
    assert refused(1, b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 15) + b"\r\n").reason == "too_long"


@pytest.mark.parametrize(("data", "reason", "detail"), [
    (b"\x10\x0c\x00\x04MQTT", "not_proxy", "no PROXY v1 header: the first byte is b'\\x10'"),
    (b"GET / HTTP/1.1\r\n", "not_proxy", "no PROXY v1 header: the first byte is b'G'"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n", "not_proxy", "no PROXY v1 header: the first byte is b'p'"),
    (v2("10.0.0.7", "10.0.0.1", 1, 2), "wrong_version", "a PROXY v2 header on a v1 listener"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 1\n", "malformed", "the line ends in LF without CR"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 1\r\n", "malformed", "unknown v1 protocol 'TCP5'"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 1\r\n", "malformed", "TCP4 takes 4 fields separated by single spaces"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "malformed", "TCP4 takes 4 fields separated by single spaces"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 1\r\n", "malformed", "'::1' is not an inet address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 1\r\n", "malformed", "'1.2.3.4' is not an inet6 address"),
    (b"PROXY TCP4 1.2.3.004 1.2.3.4 1 1\r\n", "malformed", "'1.2.3.004' is not an inet address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 1\r\n", "malformed", "port '01'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 1\r\n", "malformed", "port '+1'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 1\r\n", "malformed", "port 65536 is over 65535"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 1\r\n", "malformed", "non-ASCII bytes in the v1 line"),
    (b"PROXY TCP4 1.2.3.4\t1.2.3.4 1 1\r\n", "malformed", "control characters in the v1 line"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 1" + b" " * 80, "too_long", "no CRLF within 107 bytes"),
])
def test_v1_refusals(data, reason, detail):
    exc = refused(1, data)
    assert (exc.reason, exc.detail) == (reason, detail)


# -- v2 -----------------------------------------------------------------------------------------

def test_v2_inet_and_the_bytes_after_it():
    data = v2("192.0.2.7", "10.0.0.1", 56324, 1883)
    header, rest = parse(2, data + b"\x10")
    assert header == ProxyHeader(2, "proxy", "inet", "stream", ("192.0.2.7", 56324), ("10.0.0.1", 1883), 28)
    assert rest == b"\x10" and header.length == len(data)


def test_v2_inet6_with_tlvs_and_a_good_checksum():
    tlvs = tlv(PP2_TYPE_ALPN, b"mqtt") + tlv(PP2_TYPE_AUTHORITY, b"gw.example") + tlv(0xE0, b"")
    data = v2("2001:db8::7", "2001:db8::1", 4000, 8883, tlvs=tlvs, crc=True)
    header, _ = parse(2, data)
    assert header.client_address == ("2001:db8::7", 4000)
    assert header.tlvs[:3] == ((PP2_TYPE_ALPN, b"mqtt"), (PP2_TYPE_AUTHORITY, b"gw.example"), (0xE0, b""))
    assert header.tlvs[3][0] == PP2_TYPE_CRC32C and header.ssl is None


def test_v2_unix_local_and_unspec_name_no_client_address():
    unix, _ = parse(2, v2(unix=(b"/run/client.sock", b"/run/gw.sock")))
    assert unix.family == "unix" and unix.source == ("/run/client.sock", 0) and unix.client_address is None
    local, _ = parse(2, v2("192.0.2.7", "10.0.0.1", 1, 2, command=0))
    assert local.command == "local" and local.source is None and local.client_address is None
    unspec, _ = parse(2, v2())
    assert unspec.family == "unspec" and unspec.client_address is None


def test_v2_ssl_cn_only_when_verified_with_a_certificate():
    def ssl_of(**kw) -> SSLInfo:
        header, _ = parse(2, v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=ssl_tlv("meter-7", **kw)))
        assert header.ssl is not None
        return header.ssl

    assert ssl_of().verified_cn == "meter-7"
    assert ssl_of(client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN).verified_cn == "meter-7"
    assert ssl_of(verify=1).verified_cn is None               # the proxy could not verify it
    assert ssl_of(client=PP2_CLIENT_SSL).verified_cn is None  # no certificate sent: verify 0 says nothing
    assert ssl_of(client=0x06).verified_cn is None            # not TLS at all
    header, _ = parse(2, v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=ssl_tlv(None)))
    assert header.ssl == SSLInfo(client=7, verify=0) and header.ssl.verified_cn is None


def sig(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


INET = bytes(12)


@pytest.mark.parametrize(("data", "reason", "detail"), [
    (b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", "not_proxy",
     "no PROXY v2 signature: the first byte is b'\\x10'"),
    (b"\r\n\r\n\x00\r\nQUIX", "not_proxy", "no PROXY v2 signature: the first byte is b'\\r'"),
    (v1("1.2.3.4", "1.2.3.4", 1, 1), "wrong_version", "a PROXY v1 header on a v2 listener"),
    (sig(0x11, 0x11, INET), "malformed", "v2 version nibble 1, not 2"),
    (sig(0x22, 0x11, INET), "malformed", "v2 command 0x2 (0 LOCAL, 1 PROXY)"),
    (sig(0x21, 0x41, INET), "malformed", "v2 family/transport byte 0x41"),
    (sig(0x21, 0x13, INET), "malformed", "v2 family/transport byte 0x13"),
    (sig(0x21, 0x11, bytes(11)), "malformed", "inet needs 12 address bytes, the header has 11"),
    (sig(0x21, 0x21, INET), "malformed", "inet6 needs 36 address bytes, the header has 12"),
    (sig(0x21, 0x11, INET + b"\x01\x00"), "malformed", "2 bytes after the last TLV"),
    (sig(0x21, 0x11, INET + b"\x01\x00\x05abc"), "malformed", "TLV 0x01 of 5 bytes overruns the header"),
    (sig(0x21, 0x11, INET + tlv(PP2_TYPE_CRC32C, b"\0\0\0")), "malformed", "a CRC32C TLV of 3 bytes, not 4"),
    (sig(0x21, 0x11, INET + tlv(PP2_TYPE_CRC32C, b"\0\0\0\0")), "bad_checksum",
     "the header's CRC32C does not match"),
    (sig(0x21, 0x11, INET + tlv(0x20, b"\x07\0\0\0")), "malformed", "a PP2_TYPE_SSL TLV of 4 bytes (at least 5)"),
    (sig(0x21, 0x11, INET + tlv(0x20, b"\x07\0\0\0\0" + tlv(0x22, b"\xff"))), "malformed",
     "SSL sub-TLV 0x22 is not UTF-8"),
    (sig(0x21, 0x11, INET + tlv(0x20, b"\x07\0\0\0\0" + tlv(0x22, b"a") + tlv(0x22, b"b"))), "malformed",
     "SSL sub-TLV 0x22 twice"),
    (sig(0x21, 0x11, INET + tlv(0x20, b"\x07\0\0\0\0\x22\x00\x09a")), "malformed",
     "TLV 0x22 of 9 bytes overruns the header"),
    (V2_SIGNATURE + b"\x21\x11\x03\xf1", "too_long", "a 1025-byte header (at most 1024)"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "too_long", "a 65551-byte header (at most 1024)"),
])
def test_v2_refusals(data, reason, detail):
    exc = refused(2, data)
    assert (exc.reason, exc.detail) == (reason, detail)


def test_v2_checksum_covers_every_byte():
    data = v2("192.0.2.7", "10.0.0.1", 56324, 1883, tlvs=tlv(PP2_TYPE_ALPN, b"mqtt"), crc=True)
    parse(2, data)
    for i in range(16, len(data) - 7):        # up to the CRC TLV (flip its type and it is no CRC TLV)
        flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        parser = ProxyHeaderParser(2)
        parser.receive_data(flipped)
        with pytest.raises(ProxyProtocolError):
            parser.next_event()


def test_v2_cap_is_configurable():
    data = v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=tlv(0xE0, b"x" * 2000))
    assert refused(2, data).reason == "too_long"
    header, _ = parse(2, data, max_header_bytes=4096)
    assert header.tlvs == ((0xE0, b"x" * 2000),)
    with pytest.raises(ValueError):
        ProxyHeaderParser(2, max_header_bytes=16)


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283          # RFC 3720 B.4's check value
    assert crc32c(b"") == 0


# -- header_bytes_certain and header_part: what a shell may consume without passing the header ---

def test_header_bytes_certain():
    parser = ProxyHeaderParser(2)
    data = v2("192.0.2.7", "10.0.0.1", 1, 2, tlvs=ssl_tlv("meter-7"))
    assert parser.header_bytes_certain() == 16
    parser.receive_data(data[:10])
    assert parser.header_bytes_certain() == 6
    parser.receive_data(data[10:16])
    assert parser.header_bytes_certain() == len(data) - 16
    parser.receive_data(data[16:])
    assert parser.header_bytes_certain() == 0 and isinstance(parser.next_event(), ProxyHeader)
    parser = ProxyHeaderParser(1)
    assert parser.header_bytes_certain() == 15                     # b"PROXY UNKNOWN\r\n", the shortest
    parser.receive_data(b"PROXY TCP4 192.0.2")
    assert parser.header_bytes_certain() == 0                      # only the bytes can tell where it ends
    parser.receive_data(b".7 10.0.0.1 1 2\r")
    assert parser.header_bytes_certain() == 1

def consume_with_lookahead(version: int, stream: bytes, window: int) -> tuple[object, int]:
    """What a shell peeking ``window`` bytes at a time ends with, and how many bytes it consumed."""
    parser = ProxyHeaderParser(version)
    pos = 0
    while pos < len(stream):
        try:
            if parser.next_event() is not NEED_DATA:
                break
        except ProxyProtocolError as exc:
            return exc.reason, pos
        # as the shell does: blind reads of what is certain, a peek when nothing is
        take = parser.header_bytes_certain() or parser.header_part(stream[pos:pos + window])
        assert take >= 1
        parser.receive_data(stream[pos:pos + take])
        pos += take
    try:
        return parser.next_event(), pos
    except ProxyProtocolError as exc:
        return exc.reason, pos


@pytest.mark.parametrize("window", [1, 2, 5, 16, 107, 1024])
@pytest.mark.parametrize(("version", "header"), [
    (1, v1("192.0.2.7", "10.0.0.1", 56324, 1883)),
    (1, b"PROXY UNKNOWN\r\n"),
    (2, v2("192.0.2.7", "10.0.0.1", 56324, 1883, tlvs=ssl_tlv("meter-7"), crc=True)),
    (2, v2()),
])
def test_header_part_stops_exactly_at_the_end(version, header, window):
    result, consumed = consume_with_lookahead(version, header + b"\x10\x0cMQTT\r\n\n" * 3, window)
    assert isinstance(result, ProxyHeader) and consumed == len(header) == result.length


# -- hypothesis ---------------------------------------------------------------------------------

def outcome(version: int, chunks: list[bytes]) -> object:
    parser = ProxyHeaderParser(version)
    try:
        for i, chunk in enumerate(chunks):
            parser.receive_data(chunk)
            event = parser.next_event()
            if event is not NEED_DATA:
                for later in chunks[i + 1:]:
                    parser.receive_data(later)
                    assert parser.next_event() is event
                return event, parser.trailing
        return parser.next_event()
    except ProxyProtocolError as exc:
        assert exc.reason in PROXY_ERROR_REASONS
        return exc.reason, exc.detail


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


# bytes that start like a header half of the time, so the generator reaches past the signature
prefixed = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"PROXY " + b),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b"\x21" + b),
)


@SETTINGS
@given(version=st.sampled_from([1, 2]), data=prefixed, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_arbitrary_bytes_only_ever_raise_the_parsers_error_and_any_split_agrees(version, data, cuts):
    assert outcome(version, splits(data, cuts)) == outcome(version, [data])


@SETTINGS
@given(version=st.sampled_from([1, 2]), data=prefixed, window=st.integers(1, 64))
def test_header_part_never_consumes_past_the_header(version, data, window):
    result, consumed = consume_with_lookahead(version, data, window)
    if isinstance(result, ProxyHeader):
        assert consumed == result.length


def client(address: str, port: int) -> tuple[str, int]:
    """What client_address names: an IPv4-mapped IPv6 source as its IPv4 address."""
    mapped = ipaddress.ip_address(address).ipv4_mapped if ":" in address else None
    return (str(mapped) if mapped is not None else address), port


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
extra_tlvs = st.lists(st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=40)), max_size=5)


@SETTINGS
@given(pair=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), sport=ports, dport=ports, tlvs=extra_tlvs,
       cn=st.none() | st.text(min_size=1, max_size=40), crc=st.booleans(), cuts=st.lists(st.integers(0, 400),
                                                                                          max_size=8))
def test_generated_v2_headers_round_trip(pair, sport, dport, tlvs, cn, crc, cuts):
    raw_tlvs = b"".join(tlv(k, v) for k, v in tlvs) + ssl_tlv(cn)
    data = v2(pair[0], pair[1], sport, dport, tlvs=raw_tlvs, crc=crc)
    header, rest = outcome(2, splits(data + b"\x10", cuts))
    assert header.client_address == client(pair[0], sport) and header.destination == (pair[1], dport)
    assert header.ssl.verified_cn == cn and rest == b"\x10"
    assert header.tlvs[:len(tlvs)] == tuple(tlvs)


@SETTINGS
@given(pair=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), sport=ports, dport=ports,
       cuts=st.lists(st.integers(0, 120), max_size=8))
def test_generated_v1_headers_round_trip(pair, sport, dport, cuts):
    header, rest = outcome(1, splits(v1(pair[0], pair[1], sport, dport) + b"GET", cuts))
    assert header.client_address == client(pair[0], sport) and header.destination == (pair[1], dport)
    assert rest == b"GET"


@SETTINGS
@given(text=st.one_of(st.ip_addresses(v=4).map(str),
                      st.text(alphabet="0123456789.", min_size=1, max_size=17),
                      st.lists(st.integers(0, 300).map(str), min_size=3, max_size=5).map(".".join)))
def test_v1_ipv4_addresses_are_what_ipaddress_accepts(text):
    """The dotted-quad fast path accepts exactly what ipaddress.IPv4Address does, unchanged."""
    parser = ProxyHeaderParser(1)
    parser.receive_data(f"PROXY TCP4 {text} 10.0.0.1 1 2\r\n".encode())
    try:
        expected = str(ipaddress.IPv4Address(text))
    except ValueError:
        with pytest.raises(ProxyProtocolError):
            parser.next_event()
    else:
        header = parser.next_event()
        assert isinstance(header, ProxyHeader) and header.source == (expected, 1) and expected == text
