"""The TLS handshake driver of ``python -m bench tls``: THREADS blocking
clients in this process, each in a loop until DURATION has passed: a new TCP
connection, a full TLS handshake (no session resumption, the server's
certificate verified against CAFILE), CONNECT, CONNACK, DISCONNECT, close.

    python -m bench.tls_driver --target HOST:PORT --cafile FILE --duration S --threads T

Prints one JSON line: handshakes (completed loops), errors, the first error,
elapsed seconds and this process's CPU seconds. Threads, because OpenSSL's
handshake and the socket calls release the GIL, and the loop is a handful
of calls: the driver costs the machine little beside the servers.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import struct
import threading
import time

CONNECT_TIMEOUT_S = 5.0        # every socket call is bounded: a stalled server cannot hang the run


def _connect_frame(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 60) + struct.pack("!H", len(cid)) + cid
    return b"\x10" + bytes([len(body)]) + body


DISCONNECT = b"\xe0\x00"


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handshakes = 0
        self.errors = 0
        self.first_error = ""


def _client(index: int, host: str, port: int, context: ssl.SSLContext, deadline: float, counts: Counts) -> None:
    done = errors = 0
    first = ""
    while time.monotonic() < deadline:
        # a new client id each time: gridgate bans a client id that
        # reconnects in a loop, and a handshake is what a new device costs
        connect = _connect_frame(f"hs-{os.getpid()}-{index}-{done + errors}")
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw:
                # the client's Finished and its CONNECT are two small writes
                # in a row: Nagle would hold the CONNECT for the server's ACK
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    tls.sendall(connect)
                    connack = b""
                    while len(connack) < 4:
                        chunk = tls.recv(4 - len(connack))
                        if not chunk:
                            raise ConnectionError("closed before CONNACK")
                        connack += chunk
                    if connack[0] != 0x20 or connack[3] != 0:
                        raise ConnectionError(f"CONNACK refused: {connack!r}")
                    tls.sendall(DISCONNECT)
            done += 1
        except OSError as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
            time.sleep(0.01)        # a refusing server must not turn this loop into a spin
    with counts.lock:
        counts.handshakes += done
        counts.errors += errors
        counts.first_error = counts.first_error or first


def run(host: str, port: int, cafile: str, duration: float, threads: int) -> dict:
    context = ssl.create_default_context(cafile=cafile)
    counts = Counts()
    cpu0, t0 = time.process_time(), time.monotonic()
    deadline = t0 + duration
    workers = [threading.Thread(target=_client, args=(i, host, port, context, deadline, counts), daemon=True)
               for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + 4 * CONNECT_TIMEOUT_S)
    return {"handshakes": counts.handshakes, "errors": counts.errors, "first_error": counts.first_error,
            "elapsed_s": time.monotonic() - t0, "cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    print(json.dumps(run(host, int(port), args.cafile, args.duration, args.threads)), flush=True)


if __name__ == "__main__":
    main()
