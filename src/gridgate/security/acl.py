"""Who may write and read which topics: one model for every protocol.

``[auth] acl_file`` is mosquitto's acl_file format, judged as mosquitto 2.0
judges it (src/security_default.c, mosquitto_acl_check_default):

- ``user NAME`` starts NAME's section; lines before the first ``user`` are
  the anonymous section (clients without an identity).
- ``topic [read|write|readwrite|deny] FILTER`` grants (or denies) a filter in
  the current section; no access word means readwrite.
- ``pattern [read|write|readwrite|deny] FILTER`` applies to everyone, with
  ``%c`` replaced by the client id and ``%u`` by the identity (a pattern
  with ``%u`` does not apply to an anonymous client).
- ``#`` lines are comments; filters follow MQTT's rules (``+`` one level,
  ``#`` the rest, wildcards never match a ``$`` topic at the first level).

A check looks at the identity's own section first (a matching ``deny`` wins
over any grant there), then at the patterns the same way; nothing matching
is a refusal. When patterns exist, an identity or client id containing
``+``, ``#`` or ``/`` is refused outright: substituted into a pattern it
would widen the filter to other devices' topics (mosquitto refuses ``+`` and
``#``; ``/`` would climb into another device's subtree).

Without a file: a device writes ``telemetry`` and ``devices/{own id}/#`` and
reads ``devices/{own id}/commands`` (DESIGN section 10), its own id being
its identity, or for an anonymous client its client id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ACL", "READ", "WRITE", "topic_matches", "filter_problem"]

READ = 1
WRITE = 2
_DENY = 0
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": _DENY}
_DANGEROUS = frozenset("+#/")
# Verdicts remembered (identity, client id, topic, access): a batch of
# readings over HTTP asks the same few questions again and again.
_MEMO_MAX = 65_536
_MAX_TOPIC = 65_535
_SUBST = re.compile("%[cu]")


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or None."""
    if not topic_filter:
        return "empty topic filter"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > _MAX_TOPIC:
        return "topic filter longer than 65535 bytes"
    if "\x00" in topic_filter:
        return "topic filter contains NUL"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` (no wildcards) matches ``topic_filter`` (MQTT 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False                                # MQTT-4.7.2-1
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True                             # also matches the parent level ("a/#" matches "a")
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass(frozen=True, slots=True)
class _Entry:
    topic: str
    access: int         # READ | WRITE bits, or _DENY
    has_c: bool = False
    has_u: bool = False


def _judge(entries: list[_Entry], topic: str, access: int) -> bool | None:
    """True/False when an entry decides, None when none matches."""
    granted = False
    for entry in entries:
        if topic.startswith("$") and not entry.topic.startswith("$"):
            continue
        if topic_matches(entry.topic, topic):
            if entry.access == _DENY:
                return False                        # denials win, as mosquitto lists them first
            if entry.access & access:
                granted = True
    return True if granted else None


class ACL:
    """The access rules: from an acl_file, or the default without one."""

    __slots__ = ("source", "_anonymous", "_users", "_patterns", "_memo")

    def __init__(self, source: str = "", anonymous: list[_Entry] | None = None,
                 users: dict[str, list[_Entry]] | None = None, patterns: list[_Entry] | None = None) -> None:
        # "" = the default rules (no file)
        self.source = source
        self._anonymous = anonymous or []
        self._users = users or {}
        self._patterns = patterns or []
        self._memo: dict[tuple[str | None, str, str, int], bool] = {}

    @classmethod
    def parse(cls, text: str, source: str) -> tuple[ACL, list[str]]:
        """The rules of ``text``, and every problem with its line number."""
        anonymous: list[_Entry] = []
        users: dict[str, list[_Entry]] = {}
        patterns: list[_Entry] = []
        section = anonymous
        problems: list[str] = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    problems.append(f"{where}: 'user' needs a name")
                    continue
                section = users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern"):
                problems.append(f"{where}: unknown keyword {keyword!r} (user, topic or pattern)")
                continue
            if not rest:
                problems.append(f"{where}: '{keyword}' needs a topic filter")
                continue
            # as mosquitto: a first word of its own that is an access word, the rest the filter
            first, _, after = rest.partition(" ")
            after = after.strip()
            if after:
                if first not in _ACCESS:
                    problems.append(f"{where}: access must be read, write, readwrite or deny, not {first!r}")
                    continue
                access, topic = _ACCESS[first], after
            else:
                access, topic = READ | WRITE, first
            problem = filter_problem(topic)
            if problem is not None:
                problems.append(f"{where}: {problem}: {topic!r}")
                continue
            if keyword == "topic":
                section.append(_Entry(topic, access))
            else:
                patterns.append(_Entry(topic, access, "%c" in topic, "%u" in topic))
        return cls(source, anonymous, users, patterns), problems

    @classmethod
    def load(cls, path: str) -> tuple[ACL, list[str]]:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            return cls(path), [f"auth.acl_file {path}: cannot read it: {exc}"]
        return cls.parse(text, path)

    # -- checks -------------------------------------------------------------------

    def may_write(self, identity: str | None, client_id: str, topic: str) -> bool:
        """Whether a client (``identity`` None: anonymous) may publish to ``topic``."""
        return self._check(identity, client_id, topic, WRITE)

    def may_read(self, identity: str | None, client_id: str, topic: str) -> bool:
        """Whether a client may receive what is published to ``topic``."""
        return self._check(identity, client_id, topic, READ)

    def may_write_device(self, identity: str | None, device_id: str, client_id: str | None = None) -> bool:
        """Whether readings of ``device_id`` may come from this client: a
        write to ``devices/{device_id}/telemetry``. Over HTTP there is no
        client id: the identity stands for it, or for an anonymous client
        each reading's own device id."""
        if client_id is None:
            client_id = identity if identity is not None else device_id
        return self._check(identity, client_id, f"devices/{device_id}/telemetry", WRITE)

    def _check(self, identity: str | None, client_id: str, topic: str, access: int) -> bool:
        key = (identity, client_id, topic, access)
        verdict = self._memo.get(key)
        if verdict is None:
            verdict = self._default(identity, client_id, topic, access) if not self.source else \
                self._from_file(identity, client_id, topic, access)
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()                   # bounded; refilled by what is asked now
            self._memo[key] = verdict
        return verdict

    @staticmethod
    def _default(identity: str | None, client_id: str, topic: str, access: int) -> bool:
        own = identity if identity is not None else client_id
        if not own or _DANGEROUS.intersection(own):
            return False
        if access == WRITE:
            return topic == "telemetry" or topic_matches(f"devices/{own}/#", topic)
        return topic == f"devices/{own}/commands"

    def _from_file(self, identity: str | None, client_id: str, topic: str, access: int) -> bool:
        own = self._anonymous if identity is None else self._users.get(identity, [])
        verdict = _judge(own, topic, access)
        if verdict is not None:
            return verdict
        if not self._patterns:
            return False
        if _DANGEROUS.intersection(client_id) or (identity is not None and _DANGEROUS.intersection(identity)):
            return False
        # one pass, as mosquitto: an id containing "%u" is not substituted again
        names = {"%c": client_id, "%u": identity or "%u"}

        def name(m: re.Match[str]) -> str:
            return names[m.group(0)]
        substituted: list[_Entry] = []
        for entry in self._patterns:
            if entry.has_u and identity is None:
                continue
            text = _SUBST.sub(name, entry.topic)
            substituted.append(_Entry(text, entry.access))
        return bool(_judge(substituted, topic, access))
