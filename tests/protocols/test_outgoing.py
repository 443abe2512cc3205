"""The one ack writer both the MQTT and the WebSocket sessions use."""
from __future__ import annotations

import trio
import trio.testing

from gridgate.protocols.outgoing import Outgoing, wait_acks_sent


class SlowPeer:
    """Takes each batch after 1 s (autojump clock), recording batches and times."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[bytes]]] = []
        self.calls = 0

    async def send(self, items: list[bytes]) -> None:
        self.calls += 1
        await trio.sleep(1)
        self.batches.append((trio.current_time(), list(items)))


async def test_items_go_out_in_order_batched_by_one_writer(nursery, autojump_clock):
    peer = SlowPeer()
    start = trio.current_time()
    out: Outgoing[bytes] = Outgoing(peer.send, nursery.start_soon)
    out.put(b"a")
    await trio.testing.wait_all_tasks_blocked()
    # the writer took "a" and is inside send: it counts as owed, not as queued bytes
    assert (len(out), out.size, out.busy, out.idle) == (1, 0, True, False)
    out.put(b"bb")
    out.put(b"ccc")
    assert (len(out), out.size) == (3, 5)
    await out.wait_sent()
    assert out.idle and (len(out), out.size) == (0, 0)
    assert peer.batches == [(start + 1, [b"a"]), (start + 2, [b"bb", b"ccc"])]
    assert peer.calls == 2


async def test_wait_sent_serves_several_waiters_and_returns_at_once_when_idle(nursery, autojump_clock):
    peer = SlowPeer()
    out: Outgoing[bytes] = Outgoing(peer.send, nursery.start_soon)
    start = trio.current_time()
    await out.wait_sent()                       # nothing owed
    assert trio.current_time() == start
    out.put(b"x")
    done: list[float] = []

    async def waiter() -> None:
        await out.wait_sent()
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as waiters:
        waiters.start_soon(waiter)
        waiters.start_soon(waiter)
    assert done == [1.0, 1.0]


class Owner:
    """What wait_acks_sent needs of a session (OwesAcks)."""

    def __init__(self) -> None:
        self.pending = 1
        self.acks_done: trio.Event | None = None
        self.out: Outgoing[bytes] | None = None


async def test_wait_acks_sent_waits_for_the_ack_then_for_its_send(nursery, autojump_clock):
    peer = SlowPeer()
    owner = Owner()
    start = trio.current_time()

    async def durable_after_2s() -> None:
        await trio.sleep(2)
        owner.out = Outgoing(peer.send, nursery.start_soon)
        owner.out.put(b"ack")
        owner.pending -= 1
        assert owner.acks_done is not None
        owner.acks_done.set()

    nursery.start_soon(durable_after_2s)
    await wait_acks_sent(owner)
    assert trio.current_time() - start == 3.0           # 2 s to durable, 1 s to send
    assert peer.batches == [(start + 3, [b"ack"])]
    owner.pending = 0
    await wait_acks_sent(owner)                         # nothing owed: at once
    assert trio.current_time() - start == 3.0
