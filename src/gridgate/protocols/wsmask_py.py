"""WebSocket masking (RFC 6455 section 5.3) in pure Python: the twin of the
compiled ``ws_unmask`` and ``ws_mask_frames`` (src/_fastparse_ws.pxi), and
the reference the tests hold the compiled ones to.

Outside ``gridgate.protocols.websocket`` so that the load generator, which
masks what the gateway unmasks, can use it (and the compiled one) through
``gridgate.protocols.wsmask`` without importing the server's WebSocket layer.
"""
from __future__ import annotations

__all__ = ["ws_unmask", "ws_mask_frames"]

_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]
_SMALL_PAYLOAD = 2048

Buffer = bytes | bytearray | memoryview


def _bytes(obj: Buffer, what: str) -> bytes:
    # as the compiled one takes it: a bytes-like object (not an int, which bytes() would take as a length)
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{what} is not a C-contiguous buffer")
    return view.tobytes()


def ws_unmask(payload: Buffer, key: Buffer) -> bytes:
    """``payload`` XOR ``key`` (4 bytes) repeated over it."""
    key = _bytes(key, "key")
    if len(key) != 4:
        raise ValueError(f"a masking key is 4 bytes, not {len(key)}")
    n = len(payload)
    if not n:
        return b""
    if n <= _SMALL_PAYLOAD:
        # one XOR of two integers (the key repeated, cut to n bytes by the AND): no Python loop per byte
        stream = int.from_bytes(key * ((n >> 2) + 1), "little") & ((1 << (n << 3)) - 1)
        return (int.from_bytes(payload, "little") ^ stream).to_bytes(n, "little")
    # long payloads: every 4th byte through a 256-byte XOR table, four C-level passes
    data = bytearray(payload)
    for i in range(4):
        data[i::4] = data[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(data)


def ws_mask_frames(window: Buffer, frame_bytes: int, key_at: int, keys: Buffer) -> bytes:
    """Frames of ``frame_bytes`` bytes each, masked: frame i's bytes from
    ``key_at`` on XOR ``keys[4 i:4 i + 4]`` repeated (zero key fields come
    out as the keys). ``len(window)`` is ``frame_bytes`` times the keys."""
    if key_at < 0 or frame_bytes < key_at + 4:
        raise ValueError(f"a frame of {frame_bytes} bytes has no 4-byte key field at {key_at}")
    keys = _bytes(keys, "keys")
    if len(keys) % 4:
        raise ValueError(f"keys of {len(keys)} bytes, not a multiple of 4")
    count, n = len(keys) // 4, len(window)
    if n % frame_bytes or n // frame_bytes != count:
        raise ValueError(f"a window of {n} bytes is not {count} frames of {frame_bytes} bytes")
    if not n:
        return b""
    # the mask stream: per frame, zeros over its header, then its key repeated; one XOR of two integers
    span, reps, zeros = frame_bytes - key_at, (frame_bytes - key_at + 3) // 4, bytes(key_at)
    stream = zeros + zeros.join([(keys[j:j + 4] * reps)[:span] for j in range(0, 4 * count, 4)])
    return (int.from_bytes(window, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
