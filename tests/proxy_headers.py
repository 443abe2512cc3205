"""PROXY protocol headers built for tests, from the spec's layout
(haproxy.org proxy-protocol.txt), independently of the parser under test."""
from __future__ import annotations

import ipaddress
import struct

from gridgate.protocols.proxy_protocol import PP2_SUBTYPE_SSL_CN, PP2_TYPE_CRC32C, PP2_TYPE_SSL, V2_SIGNATURE, crc32c


def v1(source: str, dest: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def ssl_tlv(cn: str | None, *, verify: int = 0, client: int = 0x07) -> bytes:
    subs = tlv(PP2_SUBTYPE_SSL_CN, cn.encode()) if cn is not None else b""
    return tlv(PP2_TYPE_SSL, bytes([client]) + verify.to_bytes(4, "big") + subs)


def v2(source: str | None = None, dest: str | None = None, sport: int = 0, dport: int = 0, *,
       command: int = 1, tlvs: bytes = b"", crc: bool = False, unix: tuple[bytes, bytes] | None = None) -> bytes:
    """A v2 header; ``crc``: with a PP2_TYPE_CRC32C TLV at the end, computed over the whole header."""
    if unix is not None:
        family, addresses = 0x31, unix[0].ljust(108, b"\0") + unix[1].ljust(108, b"\0")
    elif source is None:
        family, addresses = 0x00, b""
    elif ":" in source:
        family = 0x21
        addresses = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address(dest).packed
        addresses += struct.pack("!HH", sport, dport)
    else:
        family = 0x11
        addresses = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(dest).packed
        addresses += struct.pack("!HH", sport, dport)
    body = addresses + tlvs + (tlv(PP2_TYPE_CRC32C, b"\0\0\0\0") if crc else b"")
    header = V2_SIGNATURE + bytes([0x20 | command, family]) + len(body).to_bytes(2, "big") + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
