"""The PROXY protocol header a load balancer sends before the client's bytes
(HAProxy's ``send-proxy`` / ``send-proxy-v2``; haproxy.org's
``proxy-protocol.txt``), parsed sans-IO: bytes in, a ``ProxyHeader`` or a
``ProxyProtocolError`` out, no sockets.

- v1: one text line, ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n``, at most 107 bytes.
- v2: a 12-byte signature, version/command, family/transport, a length and
  the addresses (AF_INET, AF_INET6, AF_UNIX), then TLVs: CRC32C (checked
  when present), PP2_TYPE_SSL with its sub-TLVs (the client certificate's CN
  among them), and any other, kept as they are. A header longer than
  ``max_header_bytes`` (1 KiB by default) is an error, not a longer wait.

A header is read once per connection, before the protocol's own bytes: not
the per-reading hot path, so this is plain Python with no compiled twin
(DESIGN: the twin pattern is for the hot path only).

Use: ``receive_data(bytes)`` then ``next_event()``, which returns the
``ProxyHeader`` or ``NEED_DATA``. A shell that must not read past the header
(it hands the socket on to a session that reads it directly) reads
``header_bytes_certain()`` bytes blind, and when that is 0 (a v1 line of
unknown length) asks ``header_part(lookahead)`` how many of the bytes it
peeked belong to the header, and consumes only those.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ProxyProtocolError", "ProxyHeader", "SSLInfo", "ProxyHeaderParser", "NEED_DATA", "NeedData",
    "PROXY_ERROR_REASONS", "V1_MAX_BYTES", "V2_SIGNATURE", "DEFAULT_MAX_HEADER_BYTES", "crc32c",
    "PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "PP2_TYPE_CRC32C", "PP2_TYPE_NOOP", "PP2_TYPE_UNIQUE_ID",
    "PP2_TYPE_SSL", "PP2_TYPE_NETNS", "PP2_SUBTYPE_SSL_VERSION", "PP2_SUBTYPE_SSL_CN", "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_SIG_ALG", "PP2_SUBTYPE_SSL_KEY_ALG", "PP2_CLIENT_SSL", "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
]

V1_PREFIX: Final = b"PROXY "
V1_MAX_BYTES: Final = 107                   # the spec's bound, CRLF included
_V1_MIN_BYTES: Final = len(b"PROXY UNKNOWN\r\n")
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES: Final = 16                  # signature, ver/cmd, fam/transport, length
DEFAULT_MAX_HEADER_BYTES: Final = 1024

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

# What a refusal is counted as (gridgate_proxy_protocol_refused{reason}):
# the parser's own, then the shell's (gridgate.protocols.proxied).
PROXY_ERROR_REASONS: Final = (
    "not_proxy",        # the first bytes are no PROXY signature: a client that skipped the proxy
    "wrong_version",    # a v1 header on a v2 listener or the reverse
    "malformed",        # a field out of the grammar, lengths that do not add up
    "too_long",         # over 107 bytes (v1) or max_header_bytes (v2)
    "bad_checksum",     # a PP2_TYPE_CRC32C that does not match
    "untrusted_source",  # a connection to a proxy_protocol listener from outside trusted_proxies
    "timeout",          # no complete header within the deadline
    "closed",           # the peer closed before the header ended
)

_AddressPair = tuple[str, int]
_FAMILIES: Final = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}
_ADDRESS_BYTES: Final = {"unspec": 0, "inet": 12, "inet6": 36, "unix": 216}
_TRANSPORTS: Final = {0x0: "unspec", 0x1: "stream", 0x2: "dgram"}


class ProxyProtocolError(Exception):
    """The header is refused: ``reason`` is one of PROXY_ERROR_REASONS (a
    metric label), ``detail`` says what was wrong for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NeedData:
    """``next_event`` has no complete header yet."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """PP2_TYPE_SSL: how the client reached the proxy. ``verify`` is 0 when
    the client's certificate was verified; ``client`` holds the PP2_CLIENT_* bits."""

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    @property
    def verified_cn(self) -> str | None:
        """The client certificate's CN, only when the client spoke TLS, sent a
        certificate (on this connection or its resumed session) and the proxy
        verified it: HAProxy sends verify 0 for a client that sent none, so the
        certificate bits are checked too."""
        if self.verify != 0 or not self.client & PP2_CLIENT_SSL:
            return None
        if not self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS):
            return None
        return self.cn or None


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``command`` "local": the proxy's own connection (a health check): use the
    connection's real addresses. ``source``/``destination``: (address, port)
    for TCP over IPv4 or IPv6, the socket path with port 0 for AF_UNIX, None
    for LOCAL, UNKNOWN and AF_UNSPEC. ``length``: header bytes, all consumed.
    """

    version: int
    command: Literal["proxy", "local"]
    family: str                              # "inet", "inet6", "unix", "unspec"
    transport: str                           # "stream", "dgram", "unspec" (v1: "stream")
    source: _AddressPair | None
    destination: _AddressPair | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()
    ssl: SSLInfo | None = None

    @property
    def client_address(self) -> _AddressPair | None:
        """The client's IP address and port, when the header names one. An
        IPv4-mapped IPv6 source (a proxy listening dual-stack) is given as
        the IPv4 address, so that limits and bans count one client as one."""
        if self.command != "proxy" or self.family not in ("inet", "inet6") or self.source is None:
            return None
        if self.family == "inet6":
            mapped = ipaddress.IPv6Address(self.source[0]).ipv4_mapped
            if mapped is not None:
                return str(mapped), self.source[1]
        return self.source


class ProxyHeaderParser:
    """One connection's header, ``version`` 1 or 2 (the listener's
    ``proxy_protocol``; a header of the other version is refused).

    After the first error every call raises it again: a refused header
    never becomes a valid one with more bytes.
    """

    def __init__(self, version: Literal[1, 2], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if version not in (1, 2):
            raise ValueError(f"PROXY protocol version must be 1 or 2, not {version!r}")
        if max_header_bytes < V2_FIXED_BYTES + _ADDRESS_BYTES["inet6"]:
            raise ValueError(f"max_header_bytes must be at least {V2_FIXED_BYTES + _ADDRESS_BYTES['inet6']}")
        self.version = version
        self.max_header_bytes = max_header_bytes
        self._buf = bytearray()
        self._result: ProxyHeader | None = None
        self._error: ProxyProtocolError | None = None

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return len(self._buf)

    @property
    def trailing(self) -> bytes:
        """Bytes fed after the header: the first bytes of the client's protocol."""
        if self._result is None:
            return b""
        return bytes(self._buf[self._result.length:])

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once complete, else NEED_DATA.

        Raises:
            ProxyProtocolError: the bytes so far cannot start or be a valid header.
        """
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            result = self._parse_v1() if self.version == 1 else self._parse_v2()
        except ProxyProtocolError as exc:
            self._error = exc
            raise
        if result is not None:
            self._result = result
            return result
        return NEED_DATA

    def header_bytes_certain(self) -> int:
        """How many more bytes belong to the header whatever they turn out to
        be, so a shell may read them blind: v2, up to its 16-byte fixed part,
        then up to the length that gives; v1, up to the shortest line (15
        bytes, ``PROXY UNKNOWN\\r\\n``), then 1 after a CR. 0 when only a
        look at what is waiting can tell (``header_part``), or once complete."""
        if self._result is not None or self._error is not None:
            return 0
        have = len(self._buf)
        if self.version == 2:
            if have < V2_FIXED_BYTES:
                return V2_FIXED_BYTES - have
            return max(0, V2_FIXED_BYTES + int.from_bytes(self._buf[14:16], "big") - have)
        if have < _V1_MIN_BYTES:
            return _V1_MIN_BYTES - have
        return 1 if self._buf[-1] == 0x0D else 0

    def header_part(self, lookahead: bytes) -> int:
        """How many leading bytes of ``lookahead`` (bytes that would follow
        those fed so far) belong to the header as far as they show: never
        one past its end. Bytes that make the header invalid count as header,
        so that feeding them raises. 0 once the header is complete."""
        if self._result is not None or not lookahead:
            return 0
        have = len(self._buf)
        seen = bytes(self._buf) + lookahead
        if self.version == 1:
            end = seen.find(b"\n", 0, V1_MAX_BYTES)
            return len(lookahead) if end < 0 else max(1, end + 1 - have)
        if len(seen) < V2_FIXED_BYTES:
            return len(lookahead)
        total = V2_FIXED_BYTES + int.from_bytes(seen[14:16], "big")
        return max(1, min(len(lookahead), total - have))

    # -- v1 -------------------------------------------------------------------------------

    def _parse_v1(self) -> ProxyHeader | None:
        buf = self._buf
        prefix = bytes(buf[:len(V1_PREFIX)])
        if not V1_PREFIX.startswith(prefix):
            if V2_SIGNATURE.startswith(bytes(buf[:len(V2_SIGNATURE)])):
                if len(buf) >= len(V2_SIGNATURE):
                    raise ProxyProtocolError("wrong_version", "a PROXY v2 header on a v1 listener")
                return None
            # the first byte only: the detail must not depend on how the bytes were split
            raise ProxyProtocolError("not_proxy", f"no PROXY v1 header: the first byte is {prefix[:1]!r}")
        end = buf.find(b"\n", 0, V1_MAX_BYTES)
        if end < 0:
            if len(buf) >= V1_MAX_BYTES:
                raise ProxyProtocolError("too_long", f"no CRLF within {V1_MAX_BYTES} bytes")
            return None
        if end == 0 or buf[end - 1] != 0x0D:
            raise ProxyProtocolError("malformed", "the line ends in LF without CR")
        try:
            line = bytes(buf[len(V1_PREFIX):end - 1]).decode("ascii")
        except UnicodeDecodeError:
            raise ProxyProtocolError("malformed", "non-ASCII bytes in the v1 line") from None
        if not line.isprintable():
            raise ProxyProtocolError("malformed", "control characters in the v1 line")
        length = end + 1
        parts = line.split(" ")
        if parts[0] == "UNKNOWN":
            # the spec: whatever follows UNKNOWN up to CRLF is ignored
            return ProxyHeader(1, "proxy", "unspec", "stream", None, None, length)
        if parts[0] not in ("TCP4", "TCP6"):
            raise ProxyProtocolError("malformed", f"unknown v1 protocol {parts[0][:10]!r}")
        if len(parts) != 5:
            raise ProxyProtocolError("malformed", f"{parts[0]} takes 4 fields separated by single spaces")
        family = "inet" if parts[0] == "TCP4" else "inet6"
        src = _v1_address(parts[1], family)
        dst = _v1_address(parts[2], family)
        return ProxyHeader(1, "proxy", family, "stream", (src, _v1_port(parts[3])), (dst, _v1_port(parts[4])),
                           length)

    # -- v2 -------------------------------------------------------------------------------

    def _parse_v2(self) -> ProxyHeader | None:
        buf = self._buf
        head = bytes(buf[:len(V2_SIGNATURE)])
        if not V2_SIGNATURE.startswith(head):
            if V1_PREFIX.startswith(head[:len(V1_PREFIX)]):
                if len(head) >= len(V1_PREFIX):
                    raise ProxyProtocolError("wrong_version", "a PROXY v1 header on a v2 listener")
                return None
            raise ProxyProtocolError("not_proxy", f"no PROXY v2 signature: the first byte is {head[:1]!r}")
        if len(buf) < V2_FIXED_BYTES:
            return None
        ver_cmd, fam_transport, body_len = buf[12], buf[13], int.from_bytes(buf[14:16], "big")
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError("malformed", f"v2 version nibble {ver_cmd >> 4}, not 2")
        total = V2_FIXED_BYTES + body_len
        if total > self.max_header_bytes:
            raise ProxyProtocolError("too_long", f"a {total}-byte header (at most {self.max_header_bytes})")
        if len(buf) < total:
            return None
        command_bits = ver_cmd & 0x0F
        if command_bits not in (0x0, 0x1):
            raise ProxyProtocolError("malformed", f"v2 command {command_bits:#x} (0 LOCAL, 1 PROXY)")
        family = _FAMILIES.get(fam_transport >> 4)
        transport = _TRANSPORTS.get(fam_transport & 0x0F)
        if family is None or transport is None:
            raise ProxyProtocolError("malformed", f"v2 family/transport byte {fam_transport:#04x}")
        body = bytes(buf[V2_FIXED_BYTES:total])
        address_bytes = _ADDRESS_BYTES[family]
        if len(body) < address_bytes:
            raise ProxyProtocolError("malformed", f"{family} needs {address_bytes} address bytes, the header has "
                                                  f"{len(body)}")
        tlvs: tuple[tuple[int, bytes], ...] = ()
        ssl = None
        if len(body) > address_bytes:
            walked = _walk_tlvs(body, address_bytes)
            crcs = [(at, value) for kind, value, at in walked if kind == PP2_TYPE_CRC32C]
            if len(crcs) > 1:
                raise ProxyProtocolError("malformed", "more than one CRC32C TLV")
            if crcs:
                _check_crc(bytes(buf[:total]), V2_FIXED_BYTES + crcs[0][0], crcs[0][1])
            tlvs = tuple((kind, value) for kind, value, _ in walked)
            ssl = next((_ssl_info(value) for kind, value in tlvs if kind == PP2_TYPE_SSL), None)
        if command_bits == 0x0:
            # LOCAL: the proxy's own connection; its addresses are to be ignored
            return ProxyHeader(2, "local", family, transport, None, None, total, tlvs, ssl)
        src, dst = _v2_addresses(body, family)
        return ProxyHeader(2, "proxy", family, transport, src, dst, total, tlvs, ssl)


_DOTTED_QUAD: Final = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                                  r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])", re.ASCII)


def _v1_address(text: str, family: str) -> str:
    # the common case without ipaddress (a tenth of its cost): the same
    # canonical dotted quad ipaddress accepts, no leading zeros
    if family == "inet" and _DOTTED_QUAD.fullmatch(text):
        return text
    try:
        address = ipaddress.IPv4Address(text) if family == "inet" else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError("malformed", f"{text[:46]!r} is not an {family} address") from None
    return str(address)


def _v1_port(text: str) -> int:
    # decimal without sign, spaces or leading zeros (int() would take "+1", " 1", "0_1")
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyProtocolError("malformed", f"port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("malformed", f"port {port} is over 65535")
    return port


def _v2_addresses(body: bytes, family: str) -> tuple[_AddressPair | None, _AddressPair | None]:
    if family == "inet":
        # formatted by hand: a quarter of ipaddress's cost, once per connection
        a, b, c, d, e, f, g, h, sport, dport = struct.unpack_from("!8BHH", body)
        return (f"{a}.{b}.{c}.{d}", sport), (f"{e}.{f}.{g}.{h}", dport)
    if family == "inet6":
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        return (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport)
    if family == "unix":
        return (_unix_path(body[:108]), 0), (_unix_path(body[108:216]), 0)
    return None, None


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def _walk_tlvs(body: bytes, offset: int) -> list[tuple[int, bytes, int]]:
    """(type, value, where the value starts in ``body``) of each TLV from ``offset`` to the end."""
    tlvs = []
    while offset < len(body):
        if offset + 3 > len(body):
            raise ProxyProtocolError("malformed", f"{len(body) - offset} bytes after the last TLV")
        kind, size = body[offset], int.from_bytes(body[offset + 1:offset + 3], "big")
        if offset + 3 + size > len(body):
            raise ProxyProtocolError("malformed", f"TLV {kind:#04x} of {size} bytes overruns the header")
        tlvs.append((kind, body[offset + 3:offset + 3 + size], offset + 3))
        offset += 3 + size
    return tlvs


def _check_crc(header: bytes, at: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyProtocolError("malformed", f"a CRC32C TLV of {len(value)} bytes, not 4")
    zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4:]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyProtocolError("bad_checksum", "the header's CRC32C does not match")


def _ssl_info(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise ProxyProtocolError("malformed", f"a PP2_TYPE_SSL TLV of {len(value)} bytes (at least 5)")
    client, verify = value[0], int.from_bytes(value[1:5], "big")
    fields: dict[str, str] = {}
    names = {PP2_SUBTYPE_SSL_VERSION: "version", PP2_SUBTYPE_SSL_CN: "cn", PP2_SUBTYPE_SSL_CIPHER: "cipher",
             PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg", PP2_SUBTYPE_SSL_KEY_ALG: "key_alg"}
    for kind, sub, _ in _walk_tlvs(value, 5):
        name = names.get(kind)
        if name is None:
            continue
        try:
            text = sub.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyProtocolError("malformed", f"SSL sub-TLV {kind:#04x} is not UTF-8") from None
        if name in fields:
            # two CNs: which one is the device would be a guess
            raise ProxyProtocolError("malformed", f"SSL sub-TLV {kind:#04x} twice")
        fields[name] = text
    return SSLInfo(client, verify, **fields)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF
