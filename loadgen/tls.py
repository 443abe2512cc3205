"""TLS for MQTT devices (``--tls``, ``--cafile``): the stdlib ``ssl``
module on the device's own non-blocking socket, driven like
``RawSocketStream`` (one ``send`` per window, one ``recv`` per read), not
``trio.SSLStream``, whose memory BIOs copy every byte twice more and cost
more CPU per reading than the server spends on it.
"""
from __future__ import annotations

import functools
import socket
import ssl

import trio

__all__ = ["TlsSocketStream", "client_context"]


@functools.cache
def client_context(cafile: str) -> ssl.SSLContext:
    """One context per process and CA file (loading the CAs once, not per
    device); ``""`` trusts the system's CAs. Hostnames are checked."""
    return ssl.create_default_context(cafile=cafile or None)


class TlsSocketStream:
    """A TLS connection on a non-blocking ``ssl.SSLSocket``, with the
    interface of ``RawSocketStream`` (``send_all``, ``receive_some``,
    ``aclose``). Two tasks sending at once is an error, as with
    ``SocketStream``. Trio is single-threaded, so OpenSSL never sees two calls
    on one connection at the same time; a write that wanted the socket is
    retried with the same bytes, as OpenSSL requires."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock
        self._sending = False

    @classmethod
    async def handshake(cls, stream: trio.SocketStream, context: ssl.SSLContext,
                        server_hostname: str) -> TlsSocketStream:
        """Take over ``stream``'s socket and complete a TLS handshake on it
        (the caller bounds the time). ``stream`` is left detached."""
        raw = socket.socket(fileno=stream.socket.detach())
        raw.setblocking(False)
        sock = context.wrap_socket(raw, server_hostname=server_hostname, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(sock)
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        return cls(sock)

    async def send_all(self, data: bytes) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            sock, view, sent = self.socket, memoryview(data), 0
            while sent < len(view):
                try:
                    sent += sock.send(view[sent:])
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(sock)
                except ssl.SSLWantReadError:      # not in TLS 1.3 or without renegotiation; kept correct
                    await trio.lowlevel.wait_readable(sock)
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        sock = self.socket
        # Decrypted bytes OpenSSL already holds would never make the socket
        # readable: take them first. Without read-ahead the rest of a record
        # is still in the kernel, so otherwise waiting first saves a recv.
        if sock.pending():
            return sock.recv(max_bytes)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(max_bytes)
            except ssl.SSLWantReadError:          # a partial record, or only a session ticket
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)

    async def aclose(self) -> None:
        # no close_notify: a device that ends or drops just closes, as the
        # plain stream does (a device's DISCONNECT already said goodbye)
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
