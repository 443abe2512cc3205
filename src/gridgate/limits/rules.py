"""Which buckets a reading counts against: the device's own, and one shared
bucket per ``[[limits.rule]]`` it matches (the seed's
``protocol@vendor#region`` resources).

Matching a rule is a few string compares and, for ``device``, a glob; the
answer for one (protocol, vendor, region, device) is remembered in a bounded
table, so a steady fleet pays a dictionary lookup per reading.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gridgate.config import LimitRule, LimitsConfig
from gridgate.limits.buckets import BoundedTable, TokenBucket

__all__ = ["Charge", "Limiter", "DEVICE"]

# The name under which device limits are reported (metrics, logs); rule
# names cannot take it (config.RULE_NAME_RE wants a letter or digit first).
DEVICE = "_device"


@dataclass(frozen=True, slots=True)
class Charge:
    """What a charge found: ``wait`` seconds before the next read (0.0: none),
    and ``name`` of the bucket that asked for the longest wait."""
    wait: float
    name: str


_FREE = Charge(0.0, "")


def _matches(rule: LimitRule, protocol: str, vendor: str | None, region: str | None, device: str) -> bool:
    return ((rule.protocol is None or rule.protocol == protocol)
            and (rule.vendor is None or rule.vendor == vendor)
            and (rule.region is None or rule.region == region)
            and (rule.device is None or fnmatchcase(device, rule.device)))


class _Rule:
    __slots__ = ("config", "bucket")

    def __init__(self, config: LimitRule, now: float) -> None:
        self.config = config
        self.bucket = TokenBucket(config.readings_per_s, config.burst, now)


class _DeviceBuckets:
    __slots__ = ("readings", "bytes")

    def __init__(self, readings: TokenBucket | None, nbytes: TokenBucket | None) -> None:
        self.readings = readings
        self.bytes = nbytes


class Limiter:
    """The token buckets of one gateway. Time is passed in by the caller."""

    def __init__(self, config: LimitsConfig, now: float) -> None:
        self._now = now
        self._rules: list[_Rule] = []
        self._devices: BoundedTable[str, _DeviceBuckets] = BoundedTable(config.max_tracked, self._new_device)
        self._matches: BoundedTable[tuple[str, str | None, str | None, str], tuple[_Rule, ...]] = \
            BoundedTable(config.max_tracked, self._match)
        self.config = config
        self.reload(config, now)

    # -- configuration ------------------------------------------------------

    def reload(self, config: LimitsConfig, now: float) -> None:
        """Apply new limits: a rule kept by name keeps its bucket's balance;
        device buckets are rebuilt lazily with the new rates."""
        old = {r.config.name: r for r in self._rules}
        rules = []
        for rc in config.rule:
            kept = old.get(rc.name)
            if kept is not None:
                kept.bucket.reconfigure(rc.readings_per_s, rc.burst)
                kept.config = rc
                rules.append(kept)
            else:
                rules.append(_Rule(rc, now))
        self._rules = rules
        self.config = config
        self._now = now
        self._devices = BoundedTable(config.max_tracked, self._new_device)
        self._matches = BoundedTable(config.max_tracked, self._match)
        self.enabled = bool(rules) or config.device_readings_per_s > 0 or config.device_bytes_per_s > 0

    @property
    def rule_names(self) -> list[str]:
        return [r.config.name for r in self._rules]

    def _new_device(self, device: str) -> _DeviceBuckets:
        c = self.config
        return _DeviceBuckets(
            TokenBucket(c.device_readings_per_s, c.device_readings_burst, self._now)
            if c.device_readings_per_s > 0 else None,
            TokenBucket(c.device_bytes_per_s, c.device_bytes_burst, self._now)
            if c.device_bytes_per_s > 0 else None)

    def _match(self, key: tuple[str, str | None, str | None, str]) -> tuple[_Rule, ...]:
        protocol, vendor, region, device = key
        return tuple(r for r in self._rules if _matches(r.config, protocol, vendor, region, device))

    # -- charging -----------------------------------------------------------

    def _buckets(self, readings: Iterable[tuple[str, str | None, str | None]], protocol: str,
                 ) -> dict[tuple[str, int], tuple[TokenBucket, int]]:
        """(bucket owner, kind) -> (bucket, readings it is charged)."""
        out: dict[tuple[str, int], tuple[TokenBucket, int]] = {}
        for device, vendor, region in readings:
            dev = self._devices.get(device)
            if dev.readings is not None:
                key = (DEVICE + ":" + device, 0)
                bucket, n = out.get(key, (dev.readings, 0))
                out[key] = (bucket, n + 1)
            for rule in self._matches.get((protocol, vendor, region, device)):
                key = (rule.config.name, 1)
                bucket, n = out.get(key, (rule.bucket, 0))
                out[key] = (bucket, n + 1)
        return out

    def charge(self, readings: Sequence[tuple[str, str | None, str | None]], protocol: str,
               device: str | None, nbytes: int, now: float) -> Charge:
        """Debit every bucket these readings count against ((device id,
        vendor, region) each) and ``nbytes`` against ``device``'s byte bucket;
        the longest wait asked for. For readers that pause (MQTT, WebSocket):
        what arrived is kept, the next read waits."""
        if not self.enabled:
            return _FREE
        self._now = now
        worst = _FREE
        for (owner, _kind), (bucket, n) in self._buckets(readings, protocol).items():
            wait = bucket.take(n, now)
            if wait > worst.wait:
                worst = Charge(wait, DEVICE if owner.startswith(DEVICE + ":") else owner)
        if device is not None and nbytes:
            dev = self._devices.get(device)
            if dev.bytes is not None:
                wait = dev.bytes.take(nbytes, now)
                if wait > worst.wait:
                    worst = Charge(wait, DEVICE)
        return worst

    def admit(self, readings: Sequence[tuple[str, str | None, str | None]], protocol: str,
              device: str | None, nbytes: int, now: float) -> Charge:
        """All or nothing, for readers that refuse (HTTP 429): if every bucket
        can take its share now, debit them all and return a zero wait; else
        debit nothing and return how long until they could (Retry-After)."""
        if not self.enabled:
            return _FREE
        self._now = now
        wanted = list(self._buckets(readings, protocol).items())
        dev_bytes = self._devices.get(device).bytes if device is not None and nbytes else None
        worst = _FREE
        for (owner, _kind), (bucket, n) in wanted:
            wait = bucket.wait_for(n, now)
            if wait > worst.wait:
                worst = Charge(wait, DEVICE if owner.startswith(DEVICE + ":") else owner)
        if dev_bytes is not None:
            wait = dev_bytes.wait_for(nbytes, now)
            if wait > worst.wait:
                worst = Charge(wait, DEVICE)
        if worst.wait > 0:
            return worst
        for _key, (bucket, n) in wanted:
            bucket.take(n, now)
        if dev_bytes is not None:
            dev_bytes.take(nbytes, now)
        return _FREE
