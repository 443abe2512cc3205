"""WebSocket masking (RFC 6455 5.3), compiled (``gridgate._fastparse``) and
its pure-Python twin (``gridgate.protocols.wsmask_py``): each against known
bytes and a byte-by-byte reference, and hypothesis checks the two agree on
arbitrary payloads, keys, lengths and kinds of buffer (slices of memoryviews
at any offset, bytearrays), and on what they refuse."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from gridgate import _fastparse, hotpath
from gridgate.protocols import wsmask_py
from gridgate.protocols.wsmask import wsmask

IMPLS = [_fastparse, wsmask_py]
# HYPOTHESIS_MAX_EXAMPLES raises the counts for a longer run (as make test-asan does)
EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300"))
IDS = ["c", "py"]


def reference(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def reference_frames(window: bytes, frame_bytes: int, key_at: int, keys: bytes) -> bytes:
    out = b""
    for i in range(len(keys) // 4):
        frame = window[i * frame_bytes:(i + 1) * frame_bytes]
        out += frame[:key_at] + reference(frame[key_at:], keys[4 * i:4 * i + 4])
    return out


def test_the_compiled_masking_is_in_use():
    assert wsmask is hotpath.fastparse is _fastparse
    from gridgate.protocols.websocket import frames
    assert frames._unmask is _fastparse.ws_unmask


def test_the_pure_python_switch_gives_the_twin_to_the_server_and_the_load_generator():
    code = ("from gridgate.protocols.wsmask import wsmask\n"
            "from gridgate.protocols.websocket import frames\n"
            "from loadgen import ws_device\n"
            "print(wsmask.__name__, frames._unmask.__module__, ws_device._mask_frames.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"GRIDGATE_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": os.pathsep.join(sys.path)})
    twin = "gridgate.protocols.wsmask_py"
    assert out.stdout.split() == [twin, twin, twin]


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_rfc_6455_example(impl):
    # section 5.7: "Hello" in a masked frame with key 37 fa 21 3d
    key = bytes.fromhex("37fa213d")
    assert impl.ws_unmask(b"Hello", key) == bytes.fromhex("7f9f4d5158")
    assert impl.ws_unmask(bytes.fromhex("7f9f4d5158"), key) == b"Hello"
    frame = impl.ws_mask_frames(b"\x81\x85\x00\x00\x00\x00Hello", 11, 2, key)
    assert frame == bytes.fromhex("818537fa213d7f9f4d5158")


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
@pytest.mark.parametrize("n", [*range(0, 18), 63, 64, 65, 2047, 2048, 2049, 5003])
def test_every_length_and_kind_of_buffer(impl, n):
    data, key = os.urandom(n + 3), os.urandom(4)
    want = reference(data[3:], key)
    assert impl.ws_unmask(data[3:], key) == want
    assert impl.ws_unmask(memoryview(data)[3:], memoryview(bytearray(key))) == want   # unaligned start
    assert impl.ws_unmask(bytearray(data[3:]), bytearray(key)) == want
    assert type(impl.ws_unmask(bytearray(data[3:]), key)) is bytes


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_a_window_of_frames_each_with_its_key(impl):
    head = b"\x81\x8c"                          # 12-byte payloads: 2 + 4 + 12 = 18 bytes a frame
    window = b"".join(head + b"\0\0\0\0" + b"payload %04d" % i for i in range(10))
    keys = os.urandom(40)
    masked = impl.ws_mask_frames(window, 18, 2, keys)
    assert masked == reference_frames(window, 18, 2, keys)
    for i in range(10):
        frame = masked[18 * i:18 * (i + 1)]
        assert frame[:2] == head and frame[2:6] == keys[4 * i:4 * i + 4]
        assert impl.ws_unmask(frame[6:], frame[2:6]) == b"payload %04d" % i
    assert impl.ws_mask_frames(b"", 18, 2, b"") == b""


BAD = [
    ("ws_unmask", (b"abc", b"abc")),
    ("ws_unmask", (b"abc", b"abcde")),
    ("ws_unmask", (b"abc", b"")),
    ("ws_unmask", ("abc", b"abcd")),
    ("ws_unmask", (None, b"abcd")),
    ("ws_unmask", (b"abc", 1234)),
    ("ws_mask_frames", (b"a" * 10, 5, 2, b"k" * 8)),       # no room for the key field
    ("ws_mask_frames", (b"a" * 10, 5, -1, b"k" * 8)),
    ("ws_mask_frames", (b"a" * 10, 5, 0, b"k" * 7)),       # keys not whole
    ("ws_mask_frames", (b"a" * 10, 5, 0, b"k" * 4)),       # one key for two frames
    ("ws_mask_frames", (b"a" * 11, 5, 0, b"k" * 8)),
    ("ws_mask_frames", (b"", 0, 0, b"")),
    ("ws_mask_frames", (b"a" * 10, 2 ** 62, 0, b"k" * 8)),
    ("ws_mask_frames", ("a" * 10, 5, 0, b"k" * 8)),
]


@pytest.mark.parametrize("name, args", BAD)
def test_both_refuse_the_same_input_with_the_same_error(name, args):
    errors = []
    for impl in IMPLS:
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(impl, name)(*args)
        errors.append(info.type)
    assert errors[0] is errors[1]


def as_kind(data: bytes, kind: str, offset: int) -> bytes | bytearray | memoryview:
    """``data`` as a bytes, a bytearray or a memoryview starting ``offset`` bytes into a larger buffer."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    return memoryview(bytes(offset) + data + b"tail")[offset:offset + len(data)]


kinds = st.sampled_from(["bytes", "bytearray", "memoryview"])
payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=2040, max_size=2060), st.binary(max_size=6000))


@settings(max_examples=EXAMPLES, deadline=None)
@given(payloads, st.binary(min_size=4, max_size=4), kinds, st.integers(0, 7))
def test_unmask_agrees_on_arbitrary_payloads(payload, key, kind, offset):
    got = _fastparse.ws_unmask(as_kind(payload, kind, offset), as_kind(key, kind, offset))
    assert got == wsmask_py.ws_unmask(as_kind(payload, kind, offset), key) == reference(payload, key)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, 12), st.integers(0, 40), st.integers(0, 20), st.data(), kinds, st.integers(0, 7))
def test_mask_frames_agrees_on_arbitrary_windows(key_at, payload_bytes, count, data, kind, offset):
    frame_bytes = key_at + 4 + payload_bytes
    window = data.draw(st.binary(min_size=frame_bytes * count, max_size=frame_bytes * count))
    keys = data.draw(st.binary(min_size=4 * count, max_size=4 * count))
    got = _fastparse.ws_mask_frames(as_kind(window, kind, offset), frame_bytes, key_at, as_kind(keys, kind, offset))
    assert got == wsmask_py.ws_mask_frames(window, frame_bytes, key_at, keys)
    assert got == reference_frames(window, frame_bytes, key_at, keys)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=64), st.integers(-2, 70), st.integers(-2, 12), st.binary(max_size=12))
def test_both_accept_and_refuse_the_same_arbitrary_arguments(window, frame_bytes, key_at, keys):
    results = []
    for impl in IMPLS:
        try:
            results.append(impl.ws_mask_frames(window, frame_bytes, key_at, keys))
        except ValueError as exc:
            results.append(type(exc))
    assert results[0] == results[1]
