"""What the sessions and the gateway ask of flow control: one object per
gateway, handed to sessions through ``Services.limits``.

- readings: ``pause`` (MQTT, WebSocket: what arrived is kept and
  acknowledged as usual, the connection's next read waits until its buckets
  are paid back; the session is marked ``paused`` so the reaper does not
  take the wait for silence) and ``admit`` (HTTP: all or nothing, the wait
  becomes ``Retry-After``). Quota refusals are counted, never dead-lettered:
  a flood must not fill the dead-letter store.
- connections: per-address counts, flapping bans by client id, shedding
  while the sink's commit p99 is over the threshold.

Time is ``trio.current_time()``, so all of it runs under MockClock in tests.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from gridgate.config import LimitsConfig
from gridgate.limits.bans import Ban, BanList, FlapDetector
from gridgate.limits.rules import Charge, Limiter
from gridgate.limits.shedding import CommitLatency

if TYPE_CHECKING:
    from gridgate.ingest.records import Record
    from gridgate.observability.metrics import Metrics

__all__ = ["FlowGuard"]


class FlowGuard:
    def __init__(self, config: LimitsConfig, metrics: Metrics, *, region_tag: str = "region",
                 device_configs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        now = trio.current_time()
        self.metrics = metrics
        self.region_tag = region_tag
        # [devices."<id>"] vendor: the operator's word beats a reading's tag
        self._vendors = {d: str(c["vendor"]) for d, c in (device_configs or {}).items()
                         if isinstance(c, Mapping) and isinstance(c.get("vendor"), str)}
        self.limiter = Limiter(config, now)
        self.bans = BanList(config.max_tracked)
        self.flaps = FlapDetector(self.bans, config.flapping_max_connects, config.flapping_window_s,
                                  config.flapping_ban_s, config.max_tracked)
        self.latency = CommitLatency(config.shed_commit_latency_ms)
        self.config = config
        self._per_address: dict[str, int] = {}

    @property
    def readings_limited(self) -> bool:
        """Whether any reading limit is configured (sessions skip all of it when not)."""
        return self.limiter.enabled

    def reload(self, config: LimitsConfig) -> None:
        """SIGHUP: new limits; buckets of rules kept by name keep their balance."""
        self.limiter.reload(config, trio.current_time())
        self.flaps.max_connects = config.flapping_max_connects
        self.flaps.window_s = config.flapping_window_s
        self.flaps.ban_s = config.flapping_ban_s
        if config.shed_commit_latency_ms != self.config.shed_commit_latency_ms:
            self.latency = CommitLatency(config.shed_commit_latency_ms)
        self.config = config

    # -- readings -------------------------------------------------------------

    def _keys(self, records: Sequence[Record]) -> list[tuple[str, str | None, str | None]]:
        vendors, region = self._vendors, self.region_tag
        return [(r.device_id, vendors.get(r.device_id) or r.tags.get("vendor"), r.tags.get(region))
                for r in records]

    async def pause(self, session: Any, records: Sequence[Record], protocol: str, device: str | None,
                    nbytes: int) -> None:
        """Debit these readings (and ``nbytes`` of payload for ``device``);
        sleep as long as the buckets ask, marked paused for the reaper."""
        charge = self.limiter.charge(self._keys(records), protocol, device, nbytes, trio.current_time())
        if charge.wait <= 0:
            return
        self.metrics.readings_limited.labels(charge.name, protocol).inc(len(records) or 1)
        self.metrics.limit_paused_seconds.labels(charge.name).inc(charge.wait)
        session.paused = True
        try:
            await trio.sleep(charge.wait)
        finally:
            session.paused = False

    def refuse_over_quota(self, records: Sequence[Record], protocol: str, device: str | None,
                          nbytes: int) -> Charge:
        """MQTT 5 under ``mqtt5_on_limit = "reject"``, per PUBLISH: all or
        nothing like ``admit``; a non-zero wait means refused (PUBACK 0x97),
        counted as limited, nothing debited. No 429 is counted."""
        charge = self.limiter.admit(self._keys(records), protocol, device, nbytes, trio.current_time())
        if charge.wait > 0:
            self.metrics.readings_limited.labels(charge.name, protocol).inc(len(records) or 1)
        return charge

    def admit(self, records: Sequence[Record], protocol: str, device: str | None, nbytes: int) -> Charge:
        """All or nothing: a zero wait, and the buckets debited; or how long
        to wait (``Retry-After``) with nothing debited, counted."""
        charge = self.limiter.admit(self._keys(records), protocol, device, nbytes, trio.current_time())
        if charge.wait > 0:
            self.metrics.readings_limited.labels(charge.name, protocol).inc(len(records) or 1)
            self.metrics.http_429.labels(charge.name).inc()
        return charge

    # -- connections ------------------------------------------------------------

    def banned(self, kind: str, key: str) -> Ban | None:
        return self.bans.banned(kind, key, trio.current_time())

    def on_connect(self, client_id: str, protocol: str) -> Ban | None:
        """A device connects as ``client_id``: the ban in force on it, if any
        (new when this connect makes it a flapping device)."""
        now = trio.current_time()
        before = self.bans.banned("client_id", client_id, now)
        ban = before or self.flaps.connect(client_id, now)
        if ban is not None:
            if before is None:
                self.metrics.bans.labels(ban.reason).inc()
            self.metrics.banned_connects.labels(protocol, ban.reason).inc()
        return ban

    def acquire_address(self, address: str, protocol: str) -> bool:
        """One more connection from ``address``; False (nothing taken) when
        ``max_connections_per_ip`` are already open from it."""
        limit = self.config.max_connections_per_ip
        n = self._per_address.get(address, 0)
        if limit and n >= limit:
            self.metrics.connections_over_ip_limit.labels(protocol).inc()
            return False
        self._per_address[address] = n + 1
        return True

    def release_address(self, address: str) -> None:
        n = self._per_address.get(address, 0) - 1
        if n > 0:
            self._per_address[address] = n
        else:
            self._per_address.pop(address, None)

    def shedding(self, protocol: str) -> bool:
        """Whether a new connection must be refused now (commit p99 too high)."""
        if self.latency.enabled and self.latency.shedding(trio.current_time()):
            self.metrics.connections_shed.labels(protocol).inc()
            return True
        return False

    def record_commit(self, seconds: float) -> None:
        self.latency.record(seconds, trio.current_time())
