# WebSocket masking (RFC 6455 section 5.3): the XOR of a payload with a 4-byte
# key repeated over it. Twin: gridgate/protocols/wsmask_py.py (the reference;
# both must give the same bytes for every input). The gateway unmasks every
# client frame with it, and the load generator masks its windows of frames
# with it, so neither spends an interpreter-level pass (or the big integers
# of one) per frame.
#
# A word at a time: the key twice over in a uint64, the payload read and
# written through memcpy (no unaligned dereference, which UBSan flags and
# some CPUs trap on); the phase of the key is the same at every 8-byte step,
# since 8 is a multiple of 4. Every length is checked here by hand (the
# release build has Cython's bounds checks off).

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy


cdef inline void _ws_xor(const unsigned char* src, unsigned char* dst, Py_ssize_t n,
                         const unsigned char* key) noexcept nogil:
    """dst[i] = src[i] ^ key[i % 4] for i < n (src and dst may be the same)."""
    cdef unsigned char k8[8]
    cdef uint64_t k, w
    cdef Py_ssize_t i = 0
    memcpy(k8, key, 4)
    memcpy(k8 + 4, key, 4)
    memcpy(&k, k8, 8)
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= k
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef inline int _ws_buffer(object obj, Py_buffer* view, str what) except -1:
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except BufferError:
        raise ValueError(f"{what} is not a C-contiguous buffer") from None
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    return 0


def ws_unmask(payload, key):
    """``payload`` XOR ``key`` (4 bytes) repeated over it, as bytes: a client
    frame's payload unmasked (or masked: the XOR is its own inverse). Both
    arguments are any C-contiguous bytes-like objects."""
    cdef Py_buffer p, k
    cdef bytes out
    _ws_buffer(key, &k, "key")
    try:
        if k.len != 4:
            raise ValueError(f"a masking key is 4 bytes, not {k.len}")
        _ws_buffer(payload, &p, "payload")
        try:
            out = PyBytes_FromStringAndSize(NULL, p.len)
            _ws_xor(<const unsigned char*>p.buf, <unsigned char*>PyBytes_AS_STRING(out), p.len,
                    <const unsigned char*>k.buf)
        finally:
            PyBuffer_Release(&p)
    finally:
        PyBuffer_Release(&k)
    return out


def ws_mask_frames(window, Py_ssize_t frame_bytes, Py_ssize_t key_at, keys):
    """A window of client frames of ``frame_bytes`` bytes each, masked, as
    bytes: frame i's bytes from ``key_at`` to its end (its key field, then
    its payload) XOR its key, ``keys[4 i:4 i + 4]``, repeated from there. The
    key fields of ``window`` are zeros, so they come out as the keys.
    ``len(window)`` must be ``frame_bytes`` times the number of keys."""
    cdef Py_buffer w, k
    cdef bytes out
    cdef Py_ssize_t count, i, off
    cdef const unsigned char* src
    cdef const unsigned char* kp
    cdef unsigned char* dst
    if key_at < 0 or frame_bytes < key_at + 4:
        raise ValueError(f"a frame of {frame_bytes} bytes has no 4-byte key field at {key_at}")
    _ws_buffer(keys, &k, "keys")
    try:
        if k.len % 4:
            raise ValueError(f"keys of {k.len} bytes, not a multiple of 4")
        count = k.len // 4
        _ws_buffer(window, &w, "window")
        try:
            # by division: count * frame_bytes could overflow
            if w.len % frame_bytes or w.len // frame_bytes != count:
                raise ValueError(f"a window of {w.len} bytes is not {count} frames of {frame_bytes} bytes")
            out = PyBytes_FromStringAndSize(NULL, w.len)
            src = <const unsigned char*>w.buf
            dst = <unsigned char*>PyBytes_AS_STRING(out)
            kp = <const unsigned char*>k.buf
            off = 0
            for i in range(count):
                memcpy(dst + off, src + off, key_at)
                _ws_xor(src + off + key_at, dst + off + key_at, frame_bytes - key_at, kp + 4 * i)
                off += frame_bytes
        finally:
            PyBuffer_Release(&w)
    finally:
        PyBuffer_Release(&k)
    return out
