"""The RSS floor of the pipelines bench: a bare Trio HTTP/1.1 responder.

Issue #8 asks for gridgate's fast HTTP engine at <= 0.5x the std engine's
peak RSS at 1,000 connections. Both engines carry about 36 MiB of
interpreter and imports before any connection (``import trio`` alone takes
a Python process from about 11 to 25 MiB), so a ratio of totals has a floor
that no Trio-based engine can go under. This app measures that floor in the
same run (driver wrk-1000): the interpreter, trio, and per connection one
task, one socket stream and one bounded receive buffer. Nothing else, bar
an accept loop that empties the backlog per wake-up (see `serve`), without
which it would not hold 1,000 connections under load.

It must stay bare: the standard library and trio only (no gridgate, h11 or
msgspec), no decoding, validation or storage, no timeouts, no logging. It
frames requests (head up to the blank line, a Content-Length body,
keep-alive, pipelining in order), answers every POST with the same 202
whatever its body holds and any other method with 405, and closes after an
error, ``Connection: close`` or EOF. It is the floor, not a contender: its
readings/s mean nothing.

    python -m bench.floor_app --port N        (binds 127.0.0.1, prints nothing)
"""
from __future__ import annotations

import socket
import sys

import trio

MAX_HEAD = 65536          # request line + headers; more without the blank line -> 431
MAX_BODY = 1 << 20        # gridgate's default max_body_bytes; larger -> 413
READ_SIZE = 65536         # per receive_some, as gridgate's fast engine reads
MAX_PIPELINED = 64        # answers gathered from one buffer before they are sent
BACKLOG = 4096            # as the bench asks of every contender (1,000 connections at once)
ACCEPT_BURST = 256        # connections accepted per wake-up of the accept loop (gridgate's number)

# What gridgate answers to the bench's one-reading POST, byte for byte in the
# body; fixed, since the floor never looks at what it was sent.
_BODY = b'{"accepted":1,"rejected":0,"errors":[]}'
_REASONS = {202: b"Accepted", 400: b"Bad Request", 405: b"Method Not Allowed", 411: b"Length Required",
            413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


def _answer(status: int, close: bool) -> bytes:
    body = _BODY if status == 202 else b'{"error":"%d"}' % status
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, _REASONS[status], len(body), b"Connection: close\r\n" if close else b"", body))


# every answer prebuilt: nothing is formatted per request
_ANSWERS = {(status, close): _answer(status, close) for status in _REASONS for close in (False, True)}


class Refused(Exception):
    """A request the floor will not frame: answer `status`, then close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def parse_head(head: bytes) -> tuple[bool, int, bool]:
    """(is it a POST, Content-Length, keep-alive) of a request head without
    its blank line; raises Refused for what HTTP/1.1 framing cannot trust."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refused(400)
    length = -1
    close = False
    keep_alive = parts[2] == b"HTTP/1.1"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # no colon, or whitespace in the name (obsolete line folding): garbage
        if not colon or not name or name != name.strip():
            raise Refused(400)
        name = name.lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise Refused(400)
            if len(value) > 10 or int(value) > MAX_BODY:   # checked before int() of a huge string
                raise Refused(413)
            if length >= 0 and int(value) != length:      # two lengths that disagree: smuggling
                raise Refused(400)
            length = int(value)
        elif name == b"transfer-encoding":
            raise Refused(411)   # wrk and gridgate-loadgen send Content-Length
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            close = close or b"close" in tokens
            keep_alive = keep_alive or b"keep-alive" in tokens
    return parts[0] == b"POST", max(length, 0), keep_alive and not close


async def handle(stream: trio.SocketStream) -> None:
    """One connection, in its own task (as gridgate's engines do)."""
    async with stream:
        try:
            await _serve(stream)
        except trio.BrokenResourceError:
            pass   # the client reset or left mid-answer: nothing to report


async def _serve(stream: trio.SocketStream) -> None:
    # buf always starts at the current request; it holds at most
    # MAX_HEAD + 4 + MAX_BODY + READ_SIZE bytes, since a read happens only
    # when no complete request is in it and both bounds are checked first
    buf = bytearray()
    scanned = 0   # where the search for the blank line resumes
    while True:
        out: list[bytes] = []
        close = False
        while len(out) < MAX_PIPELINED:
            end = buf.find(b"\r\n\r\n", scanned)
            if end < 0:
                scanned = max(0, len(buf) - 3)
                if len(buf) > MAX_HEAD:
                    out.append(_ANSWERS[431, True])
                    close = True
                break
            scanned = end   # while the body arrives, the next search finds the same end at once
            if end > MAX_HEAD:
                out.append(_ANSWERS[431, True])
                close = True
                break
            try:
                post, length, keep_alive = parse_head(bytes(buf[:end]))
            except Refused as exc:
                out.append(_ANSWERS[exc.status, True])
                close = True
                break
            total = end + 4 + length
            if len(buf) < total:
                break   # body still arriving
            del buf[:total]
            scanned = 0
            out.append(_ANSWERS[202 if post else 405, not keep_alive])
            if not keep_alive:
                close = True
                break
        if out:
            # pipelined requests answered in order, in one send
            await stream.send_all(b"".join(out))
        if close:
            return
        if len(out) == MAX_PIPELINED:
            continue   # more complete requests may wait in buf: answer them before reading
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return
        buf += data


async def serve(port: int, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on 127.0.0.1:`port` (0: any free port, reported to
    `task_status`) and run `handle` in a task per connection.

    Not trio.serve_tcp: it accepts one connection per scheduler pass, and
    under wrk-1000's load only about 700 of the 1,000 connections were
    accepted after 9 s, so the floor would not be measured at 1,000. Every
    wake-up here accepts what waits in the backlog (up to ACCEPT_BURST), as
    gridgate's accept loop does."""
    listener = socket.socket()
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(BACKLOG)
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            task_status.started(listener.getsockname()[1])
            while True:
                await trio.lowlevel.wait_readable(listener)
                for _ in range(ACCEPT_BURST):
                    try:
                        sock, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    except ConnectionAbortedError:
                        continue   # the client gave up while in the backlog
                    nursery.start_soon(handle, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


def main(argv: list[str] | None = None) -> int:
    # sys.argv by hand, not argparse: importing it (and gettext) adds about
    # 0.3 MiB to the very floor this app exists to measure
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--port" or not args[1].isdigit():
        print("usage: python -m bench.floor_app --port N", file=sys.stderr)
        return 2
    try:
        trio.run(serve, int(args[1]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
