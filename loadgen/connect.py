"""A TCP connect for simulated devices that costs little when it fails.

``trio.open_tcp_stream`` resolves the name and races addresses (happy
eyeballs) in a nursery of its own, so a refused connect ends in exception
groups and costs about 0.4 ms of CPU here. A fleet reconnecting to a gateway
that is restarting fails tens of thousands of connects a second, and at that
price the load generator, not the gateway, set the pace of the storm. A
numeric address needs none of that: one non-blocking socket, bound to the
source address when there is one, connected directly. Names still go through
``trio.open_tcp_stream``.
"""
from __future__ import annotations

import ipaddress
import socket

import trio

__all__ = ["open_tcp"]

# Linux: bind() picks the address only, the port comes at connect(), so
# 15,000 sockets bound to one source address do not each search for a port
# of their own (trio.open_tcp_stream sets it too).
_BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def open_tcp(host: str, port: int, *, local_address: str | None = None) -> trio.SocketStream:
    """``trio.open_tcp_stream(host, port, local_address=...)``, with a direct
    connect when ``host`` is an IP address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port, local_address=local_address)
    sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if local_address is not None:
            try:
                sock.setsockopt(socket.IPPROTO_IP, _BIND_NO_PORT, 1)
            except OSError:     # not Linux: bind() then takes a port, as it always did
                pass
            await sock.bind((local_address, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
