"""Downlink commands: from ``POST /v1/devices/{id}/commands`` to the device.

A command is handed to the connection that holds the device now (the
ConnManager knows it by device id): its protocol handler registered a
``send_command`` on the Session. Each connection keeps its commands in a
``CommandOutbox`` - a sans-IO state machine (no Trio, no sockets: ``poll(now)``
says what to send and when to look again) - and one ``DownlinkChannel`` task,
started with the first command, sends what the outbox says.

- MQTT: PUBLISH QoS 1 to ``devices/{id}/commands`` once the device subscribed
  to it (commands wait until then, so the config pushed at CONNACK goes out
  right after the SUBACK), resent with DUP=1 every ``command_retry_s`` until
  PUBACK, at most ``command_max_attempts`` sends. A QoS 0 subscription gets
  QoS 0 publishes (MQTT 3.1.1 section 3.8.4: min of both QoS), untracked.
  MQTT 5 (``responses=True``): the command also names a Response Topic and
  its id as Correlation Data, and the device's PUBLISH there acknowledges it
  (``answer``), before or after the PUBACK.
- WebSocket: ``{"command": {"id", "type", "payload"}}`` at once, answered by
  ``{"command_ack": id}``. Never resent: the connection is a reliable stream,
  a resend could only duplicate.
- Not acknowledged within ``command_ttl_s`` of being accepted (or after the
  last attempt's retry interval), or still pending when the connection
  closes: expired and counted (``gridgate_commands_expired_total``).
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from gridgate.downlink.wire import UPDATE_CONFIG, Command, CommandError, encode_command, new_command, parse_command

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.observability.metrics import Metrics

__all__ = [
    "Command", "CommandError", "CommandOutbox", "DownlinkChannel", "Send", "UPDATE_CONFIG",
    "new_command", "parse_command", "encode_command",
]


class TaskStarter(Protocol):
    """Where a DownlinkChannel starts its task: a trio.Nursery, or a
    connection's SideTasks (gridgate.connections.side_tasks), which quacks like one."""

    def start_soon(self, async_fn: Callable[[], Awaitable[object]], /) -> None: ...


class Send(msgspec.Struct, frozen=True, gc=False):
    """One transmission the outbox asks for."""

    command: Command
    key: Hashable        # MQTT packet id, or the command id on WebSocket
    dup: bool            # a redelivery (MQTT DUP flag)
    tracked: bool        # False: fire and forget (MQTT QoS 0 subscription)
    expires: float = math.inf   # when the command's TTL runs out (MQTT 5: what is left is its Message Expiry)


class _Entry:
    __slots__ = ("command", "key", "attempts", "due", "expires")

    def __init__(self, command: Command, expires: float) -> None:
        self.command = command
        self.key: Hashable = None
        self.attempts = 0
        self.due = 0.0
        self.expires = expires


class DownlinkSettings(Protocol):
    """``[downlink]`` as an outbox reads it (``gridgate.config.DownlinkConfig``)."""

    @property
    def command_ttl_s(self) -> float: ...
    @property
    def command_retry_s(self) -> float: ...
    @property
    def command_max_attempts(self) -> int: ...
    @property
    def max_queued(self) -> int: ...


class CommandOutbox:
    """The commands of one connection: waiting, then in flight until acked.

    Sans-IO: ``offer`` and ``ack`` change state, ``poll(now)`` returns what
    to (re)send now and when to poll next. Bounded by ``max_queued``
    (waiting + in flight).
    """

    def __init__(self, protocol: str, config: DownlinkSettings, metrics: Metrics, *, redeliver: bool,
                 packet_ids: bool, responses: bool = False) -> None:
        """``redeliver``: resend until acked (MQTT); ``packet_ids``: key in-flight
        commands by MQTT packet id (else by command id, as WebSocket acks name it);
        ``responses``: a command may also be acknowledged by its id (MQTT 5's
        Response Topic, see ``answer``)."""
        self.protocol = protocol
        self.ttl_s = config.command_ttl_s
        self.retry_s = config.command_retry_s
        self.max_attempts = config.command_max_attempts if redeliver else 1
        self.max_queued = config.max_queued
        self.redeliver = redeliver
        self.metrics = metrics
        self.waiting: deque[_Entry] = deque()
        self.inflight: dict[Hashable, _Entry] = {}
        self._allocate: Callable[[Command], Hashable] = (
            PacketIds(self.inflight) if packet_ids else (lambda command: command.id))
        # responses: commands sent and no longer in flight (PUBACKed, or sent
        # untracked at QoS 0) that the device may still answer by id, until
        # their TTL: command id -> (expires, already counted acknowledged).
        # At most max_queued, the oldest dropped first.
        self.responses = responses
        self.answerable: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self.ready = False       # may send (MQTT: the device subscribed)
        self.tracked = True      # expects acks (MQTT: subscription QoS 1)
        self.closed = False

    def __len__(self) -> int:
        return len(self.waiting) + len(self.inflight)

    def offer(self, command: Command, now: float) -> bool:
        """Queue a command; False when the connection already holds max_queued."""
        if self.closed or len(self) >= self.max_queued:
            return False
        self.waiting.append(_Entry(command, now + self.ttl_s))
        return True

    def set_ready(self, ready: bool, tracked: bool = True) -> None:
        self.ready = ready
        self.tracked = tracked

    def restore(self, command: Command, expires: float, key: Hashable | None, attempts: int) -> None:
        """A command of a resumed session (MQTT 5 Session Expiry): one that
        was in flight (``key``: its packet id) is redelivered at the next
        poll with DUP=1 and that packet id (MQTT-4.4.0-1), one that was
        waiting waits again; both keep their original expiry. Not bounded by
        max_queued: the stored session held no more than the connection did."""
        entry = _Entry(command, expires)
        if key is None or key in self.inflight:
            self.waiting.append(entry)
            return
        entry.key = key
        # at least one more send is owed, whatever attempts the old connection used
        entry.attempts = min(attempts, self.max_attempts - 1)
        entry.due = -math.inf
        self.inflight[key] = entry

    def ack(self, key: Hashable) -> bool:
        """The device acknowledged ``key``; False if nothing was in flight for it."""
        entry = self.inflight.pop(key, None)
        if entry is None:
            return False
        self.metrics.commands_acknowledged.labels(self.protocol).inc()
        if self.responses:
            self._answerable(entry.command.id, entry.expires, True)
        return True

    def answer(self, command_id: str, now: float) -> bool:
        """The device answered command ``command_id`` (MQTT 5: a PUBLISH to the
        Response Topic with its Correlation Data): the command is acknowledged,
        counted once whether or not its PUBACK came first. False: no command
        of this connection's with that id is in flight or answerable (unknown,
        forged, or past its TTL)."""
        for key, entry in self.inflight.items():
            if entry.command.id == command_id:
                del self.inflight[key]
                self.metrics.commands_acknowledged.labels(self.protocol).inc()
                return True
        known = self.answerable.pop(command_id, None)
        if known is None or known[0] <= now:
            return False
        if not known[1]:
            self.metrics.commands_acknowledged.labels(self.protocol).inc()
        return True

    def _answerable(self, command_id: str, expires: float, counted: bool) -> None:
        self.answerable[command_id] = (expires, counted)
        while len(self.answerable) > self.max_queued:
            self.answerable.popitem(last=False)

    def poll(self, now: float) -> tuple[list[Send], float | None]:
        """What to send now, and the time of the next poll (None: nothing pending)."""
        sends: list[Send] = []
        while self.waiting and self.waiting[0].expires <= now:
            self.waiting.popleft()
            self._expired("ttl")
        if self.ready:
            while self.waiting:
                entry = self.waiting.popleft()
                if entry.expires <= now:
                    self._expired("ttl")
                    continue
                self.metrics.commands_sent.labels(self.protocol).inc()
                if not self.tracked:
                    if self.responses:
                        self._answerable(entry.command.id, entry.expires, False)
                    sends.append(Send(entry.command, None, False, False, entry.expires))
                    continue
                entry.key = self._allocate(entry.command)
                entry.attempts = 1
                entry.due = now + self.retry_s
                self.inflight[entry.key] = entry
                sends.append(Send(entry.command, entry.key, False, True, entry.expires))
        next_poll: float | None = None
        for key, entry in list(self.inflight.items()):
            if entry.expires <= now:
                del self.inflight[key]
                self._expired("ttl")
                continue
            if self.redeliver and entry.due <= now:
                if entry.attempts >= self.max_attempts:
                    del self.inflight[key]
                    self._expired("attempts")
                    continue
                entry.attempts += 1
                entry.due = now + self.retry_s
                self.metrics.commands_redelivered.labels(self.protocol).inc()
                sends.append(Send(entry.command, key, True, True, entry.expires))
            when = min(entry.expires, entry.due) if self.redeliver else entry.expires
            next_poll = when if next_poll is None else min(next_poll, when)
        for entry in self.waiting:  # in order of offer, so the first expires first
            next_poll = entry.expires if next_poll is None else min(next_poll, entry.expires)
            break
        return sends, next_poll

    def close(self) -> None:
        """The connection is gone: whatever is pending expires."""
        if self.closed:
            return
        self.closed = True
        for _ in range(len(self)):
            self._expired("disconnected")
        self.waiting.clear()
        self.inflight.clear()
        self.answerable.clear()

    def _expired(self, why: str) -> None:
        self.metrics.commands_expired.labels(self.protocol, why).inc()


class PacketIds:
    """MQTT packet ids for server-to-client publishes: 1..65535, skipping ids in flight."""

    def __init__(self, inflight: dict[Hashable, Any]) -> None:
        self._inflight = inflight
        self._next = 0

    def __call__(self, command: Command) -> int:
        # max_queued (<= 10,000) is far below 65,535, so a free id is near
        for _ in range(65535):
            self._next = self._next % 65535 + 1
            if self._next not in self._inflight:
                return self._next
        raise RuntimeError("no free MQTT packet id")  # unreachable while max_queued < 65535


class DownlinkChannel:
    """The Trio side of one connection's outbox: a task, started with the
    first command, that sends what ``poll`` returns and sleeps until the next
    retry or expiry (no task at all for connections that never get one)."""

    def __init__(self, outbox: CommandOutbox, send: Callable[[list[Send]], Awaitable[None]],
                 nursery: TaskStarter) -> None:
        self.outbox = outbox
        self._send = send
        self._nursery = nursery
        self._started = False
        self._wakeup = trio.Event()

    def offer(self, command: Command) -> bool:
        """Session.send_command: hand a command to this connection (sync)."""
        if not self.outbox.offer(command, trio.current_time()):
            return False
        self.wake()
        return True

    def wake(self) -> None:
        if not self._started:
            self._started = True
            self._nursery.start_soon(self._run)
        else:
            self._wakeup.set()

    async def _run(self) -> None:
        try:
            while True:
                sends, next_poll = self.outbox.poll(trio.current_time())
                if sends:
                    await self._send(sends)
                    continue  # sending took time: poll again before sleeping
                self._wakeup = trio.Event()
                with trio.move_on_at(next_poll if next_poll is not None else float("inf")):
                    await self._wakeup.wait()
        finally:
            self.outbox.close()


def open_channel(session: Session, outbox: CommandOutbox, send: Callable[[list[Send]], Awaitable[None]],
                 nursery: TaskStarter, device_config: dict[str, Any] | None) -> DownlinkChannel:
    """Register the connection as the device's command route, and queue the
    device's config (if any) as UPDATE_CONFIG: the seed's "push the latest
    policy as soon as the connection is up"."""
    channel = DownlinkChannel(outbox, send, nursery)
    session.send_command = channel.offer
    if device_config is not None:
        channel.offer(new_command(UPDATE_CONFIG, device_config))
    return channel
