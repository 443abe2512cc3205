"""The Trio shell of ``proxy_protocol``: a connection to a listener with
``proxy_protocol = "v1" | "v2"`` must come from ``[service]
trusted_proxies`` and start with a complete header within the deadline;
``accept_proxy_header`` reads exactly that header off the socket and says
who the client is, or raises ``ProxyProtocolError`` (the caller counts,
logs and closes).

Exactly the header, not a byte more: the MQTT session and the fast HTTP
engine read a ``trio.SocketStream``'s file descriptor directly, so any byte
of the client's protocol read here would have to be handed back through a
wrapping stream, which turns those fast paths off for every connection
behind the proxy (that is, all of them). So no byte past the header
is taken: v2 states its length in its first 16 bytes, and a v1 line is
peeked (MSG_PEEK) to find its end before exactly that much is read. The
socket is handed on exactly where the client's own bytes begin.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable

import trio

from gridgate.protocols.proxy_protocol import (
    DEFAULT_MAX_HEADER_BYTES,
    NeedData,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)

__all__ = ["TrustedProxies", "accept_proxy_header", "ProxiedStream", "FirstRefusals"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """``[service] trusted_proxies``: the networks whose connections may
    carry a PROXY header. An IPv4-mapped IPv6 peer (``::ffff:10.0.0.5``, a
    dual-stack listener) is judged by its IPv4 address."""

    # the proxies' own addresses, remembered: a handful, asked once per connection
    KNOWN_MAX = 1024

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[_Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._trusted: set[str] = set()

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        if host in self._trusted:
            return True
        # only trusted answers are kept: a flood from other addresses adds nothing
        if self._judge(host):
            if len(self._trusted) < self.KNOWN_MAX:
                self._trusted.add(host)
            return True
        return False

    def _judge(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])      # a scoped IPv6 peer: fe80::1%eth0
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)


async def accept_proxy_header(stream: trio.SocketStream, *, version: int, trusted: TrustedProxies,
                              timeout_s: float, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> ProxyHeader:
    """The PROXY header of a freshly accepted connection, consumed from its
    socket (nothing after it is read).

    Error handling: raises ProxyProtocolError with reason "untrusted_source"
    (before reading anything), "timeout" (no complete header within
    ``timeout_s``), "closed" (EOF or a reset first), or the parser's reason.
    The stream is left open for the caller to close.
    """
    try:
        peer = stream.socket.getpeername()
    except OSError:
        raise ProxyProtocolError("closed", "the connection was gone at accept") from None
    host = peer[0] if isinstance(peer, tuple) else peer
    if host not in trusted:
        raise ProxyProtocolError("untrusted_source", f"{host!r} is not in service.trusted_proxies")
    parser = ProxyHeaderParser(1 if version == 1 else 2, max_header_bytes=max_header_bytes)
    with trio.move_on_after(timeout_s):
        return await _read_exactly_the_header(stream.socket, parser)
    raise ProxyProtocolError("timeout", f"no complete header within {timeout_s:g} s "
                                        f"({parser.received} bytes received)")


async def _read_exactly_the_header(sock: trio.socket.SocketType, parser: ProxyHeaderParser) -> ProxyHeader:
    # Straight from the descriptor, as the MQTT session reads: a trio socket
    # call yields to the scheduler even when the bytes are waiting, and a
    # header nearly always arrives whole with the client's first packet. A v2
    # header is read blind (its fixed part, then the length it gives); a v1
    # line, whose end only the bytes can show, is peeked first.
    fd = sock.fileno()
    while True:
        event = parser.next_event()
        if not isinstance(event, NeedData):
            return event
        try:
            take = parser.header_bytes_certain()
            if not take:
                # never more than a whole header could be; the parser refuses more
                waiting = await sock.recv(max(1, parser.max_header_bytes - parser.received), socket.MSG_PEEK)
                if not waiting:
                    raise ProxyProtocolError("closed", f"EOF after {parser.received} header bytes")
                take = parser.header_part(waiting)
            try:
                data = os.read(fd, take)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
        except OSError as exc:       # reset by the peer
            raise ProxyProtocolError("closed", f"{exc} after {parser.received} header bytes") from None
        if not data:
            raise ProxyProtocolError("closed", f"EOF after {parser.received} header bytes")
        parser.receive_data(data)


class ProxiedStream(trio.abc.HalfCloseableStream):
    """A connection on which the proxy ended TLS and vouched for the
    client's certificate (PP2_SUBTYPE_SSL_CN with a successful verify):
    ``proxy_certificate_cn`` is its identity, read by
    ``Authenticator.certificate`` as it reads a verified certificate's.

    Only such connections are wrapped (the others stay trio.SocketStreams
    with their fast paths); the sessions use this one through the generic
    receive_some/send_all, as they do a TLS stream.
    """

    def __init__(self, transport_stream: trio.SocketStream, certificate_cn: str) -> None:
        self.transport_stream = transport_stream
        self.proxy_certificate_cn = certificate_cn

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class FirstRefusals:
    """Which refused peers to log: one warning per peer address, not one per
    connection (a misconfigured or hostile source reconnecting in a loop would
    flood the log), and at most ``per_window`` new addresses per ``window_s``
    (a source with many addresses, an IPv6 prefix, would too); the rest are
    only counted, and ``take_unlogged()`` says how many were. The set of
    addresses seen is bounded to ``limit`` (emptied when full: such an address
    is logged once more, memory is not spent)."""

    def __init__(self, limit: int = 10_000, *, per_window: int = 20, window_s: float = 60.0) -> None:
        self.limit = limit
        self.per_window = per_window
        self.window_s = window_s
        self._seen: set[str] = set()
        self._window_start = float("-inf")
        self._in_window = 0
        self._unlogged = 0

    def first(self, host: str, now: float) -> bool:
        """Whether to log this refusal from ``host`` at time ``now``."""
        if host in self._seen:
            return False
        if now - self._window_start >= self.window_s:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.per_window:
            self._unlogged += 1
            return False
        self._in_window += 1
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(host)
        return True

    def take_unlogged(self) -> int:
        """Refusals from new addresses not logged since the last call."""
        count, self._unlogged = self._unlogged, 0
        return count
