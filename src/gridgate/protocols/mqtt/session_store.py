"""What an MQTT 5 session leaves behind for its Session Expiry Interval
(DESIGN section 4): whether the device had subscribed to its command topic,
and the commands not yet acknowledged. A device that connects again with
Clean Start 0 before the interval ends gets them (CONNACK Session Present 1).

Sans-IO and bounded: times are passed in, at most ``max_sessions`` are kept
(the least recently stored go first), and an expired one is dropped when it
is looked up or pushed out.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["StoredSession", "SessionStore", "MAX_SESSIONS"]

# Devices whose sessions are kept at once: a flood of fresh client ids with a
# long expiry must not grow memory.
MAX_SESSIONS = 100_000


class StoredSession:
    __slots__ = ("subscribed_qos", "commands", "until", "answerable")

    def __init__(self, subscribed_qos: int | None, commands: list[tuple[Any, float, int | None, int]],
                 until: float, answerable: dict[str, tuple[float, bool]] | None = None) -> None:
        self.subscribed_qos = subscribed_qos     # the command topic's granted QoS, None: not subscribed
        # (command, the time it expires, its packet id if it was in flight
        # (redelivered with it, DUP=1), sends so far), in flight first, then waiting in order;
        # whether to keep it: any of these, or answerable commands
        self.commands = commands
        self.until = until                       # the session's own expiry
        # commands delivered that the device may still answer on their Response Topic (CommandOutbox.answerable)
        self.answerable = answerable or {}


class SessionStore:
    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, StoredSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def save(self, client_id: str, session: StoredSession) -> None:
        self._sessions.pop(client_id, None)
        self._sessions[client_id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def peek(self, client_id: str, now: float) -> StoredSession | None:
        """The device's unexpired session, left in place."""
        stored = self._sessions.get(client_id)
        if stored is not None and stored.until <= now:
            del self._sessions[client_id]
            return None
        return stored

    def take(self, client_id: str, now: float) -> StoredSession | None:
        """The device's unexpired session, removed; its commands past their own expiry left out."""
        stored = self.peek(client_id, now)
        if stored is None:
            return None
        del self._sessions[client_id]
        stored.commands = [c for c in stored.commands if c[1] > now]
        return stored

    def drop(self, client_id: str) -> None:
        """Clean Start 1: the device starts afresh (MQTT-3.1.2-4)."""
        self._sessions.pop(client_id, None)
