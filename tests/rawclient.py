"""A blocking MQTT client over a plain socket, for tests that must send what
no well-behaved client library would (garbage, duplicates, violations)."""
from __future__ import annotations

import socket

from mqtt_frames import gen_connect


class RawClient:
    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed by the server after {self.buf!r}")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def connect(self, client_id: str, **kw) -> bytes:
        self.send(gen_connect(client_id, **kw))
        return self.recv_exactly(4)

    def closed_by_server(self) -> bool:
        """True once the server has closed (reads until EOF or reset)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
