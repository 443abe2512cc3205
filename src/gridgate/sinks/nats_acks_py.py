"""The NATS sink's scan of plain JetStream acks, in Python: the reference for
the compiled ``gridgate._fastparse.nats_scan_plain_acks`` (src/_fastparse_nats.pxi).

Both take the acks ``MSG <prefix><slot> <sid> +<size>\\r\\n<head><seq>}\\r\\n`` at
the head of a read (``head`` being ``{"stream":"<stream>", "seq":``) whose
size on the line is their body's, hand over their slot digits, and stop at
the first message that is anything else; the sink's parser then reads that
one the long way. tests/sinks/test_nats_acks.py holds the two to the same
results for any input.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable

__all__ = ["scan_plain_acks"]


@functools.lru_cache(maxsize=16)
def _matcher(prefix: bytes, sid: bytes, head: bytes) -> Callable[[bytearray, int], re.Match[bytes] | None]:
    # group 2 is the size on the line, checked against the body the pattern took
    return re.compile(b"MSG " + re.escape(prefix) + rb"([0-9]+) " + re.escape(sid) + rb" +([0-9]+)\r\n"
                      + re.escape(head) + rb"[0-9]+\}\r\n").match


def scan_plain_acks(buf: bytearray, pos: int, prefix: bytes, sid: bytes, head: bytes, out: list[bytes]) -> int:
    """Scan the plain acks at ``buf[pos:]``; append each one's slot digits to ``out``.

    Returns where the scan stopped: the end of the last plain ack taken, or
    ``pos`` when the message there is not one (or is cut by the end of ``buf``).
    """
    if type(buf) is not bytearray:
        raise TypeError(f"buf must be a bytearray, not {type(buf).__name__}")
    if not 0 <= pos <= len(buf):
        raise ValueError(f"pos {pos} is outside the buffer (0..{len(buf)})")
    match = _matcher(prefix, sid, head)
    while (m := match(buf, pos)) is not None and int(m[2]) == m.end() - m.end(2) - 4:
        out.append(m[1])
        pos = m.end()
    return pos
