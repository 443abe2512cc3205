"""Counters and latency histograms of a load run, mergeable across processes.

Latency is recorded in microseconds in an HdrHistogram (1 us .. 60 s, 3
significant digits). Worker processes ship their histogram encoded; the
parent adds them, which is exact: percentiles of the merge are those of one
histogram that had seen every sample.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from hdrh.histogram import HdrHistogram

__all__ = ["Stats", "new_histogram", "PERCENTILES", "cpu_bottleneck_warning", "BUSY_SHARE"]

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# A load-generating process whose CPU over the run exceeds this share of one
# core is (part of) the bottleneck: its devices wait for it, not the server.
BUSY_SHARE = 0.85


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


@dataclass
class Stats:
    devices: int = 0
    connected: int = 0          # devices connected now
    peak_connected: int = 0     # most devices connected at once (summed over workers)
    connects: int = 0           # successful connects, reconnects included
    reconnects: int = 0
    sent: int = 0               # readings sent
    acked: int = 0              # readings acknowledged (QoS 1)
    errors: int = 0             # failed connects, drops, refusals
    replayed: int = 0           # readings sent late from the offline buffer
    dropped: int = 0            # readings lost because the offline buffer was full
    unacked_at_drop: int = 0    # readings in flight when a connection dropped (resent later)
    behind: int = 0             # readings sent later than scheduled (open loop)
    rejected: int = 0           # readings the server answered as rejected (ws; also counted in errors)
    commands: int = 0           # downlink commands received and acknowledged (ws)
    # MQTT 5: readings a PUBACK refused, by reason code and Reason String ("0x99 out_of_range: temperature")
    refusals: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # The load generator's own CPU, measured (getrusage, user + system, all
    # threads) over the run: cpu_s sums every process of the run (workers and,
    # with --procs, the parent); cpu_shares has one entry per process that
    # drives devices: its CPU seconds over its elapsed seconds (1.0 = a core).
    cpu_s: float = 0.0
    cpu_shares: list[float] = field(default_factory=list)
    # The same CPU over the steady part of each process's run only: from when
    # all its devices were first connected to the deadline (connects, the
    # ramp and the drain left out; a fleet's 1,000 connects cost a third of
    # a second). Summed over processes; steady_readings: what they acked
    # (sent, when nothing is acknowledged) in those windows.
    steady_cpu_s: float = 0.0
    steady_readings: int = 0
    histogram: HdrHistogram = field(default_factory=new_histogram, repr=False)

    def record_latency_us(self, value: int) -> None:
        self.histogram.record_value(min(max(value, LOWEST_US), HIGHEST_US))

    def merge(self, other: Stats) -> None:
        for name in ("devices", "connected", "peak_connected", "connects", "reconnects", "sent", "acked",
                     "errors", "replayed", "dropped", "unacked_at_drop", "behind", "rejected", "commands"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, n in other.refusals.items():
            self.refusals[key] = self.refusals.get(key, 0) + n
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.cpu_s += other.cpu_s
        self.steady_cpu_s += other.steady_cpu_s
        self.steady_readings += other.steady_readings
        self.cpu_shares = self.cpu_shares + other.cpu_shares
        self.histogram.add(other.histogram)

    # -- wire format between worker and parent --------------------------------

    def to_wire(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "histogram"}
        data["histogram"] = self.histogram.encode().decode("ascii")
        return json.dumps(data)

    @classmethod
    def from_wire(cls, text: str) -> Stats:
        data = json.loads(text)
        hist = HdrHistogram.decode(data.pop("histogram").encode("ascii"))
        stats = cls(**data)
        stats.histogram = new_histogram()
        stats.histogram.add(hist)
        return stats

    # -- reporting --------------------------------------------------------------

    def latency_ms(self) -> dict[str, float | None]:
        h = self.histogram
        if h.get_total_count() == 0:
            return {**{f"p{p:g}": None for p in PERCENTILES}, "max": None}
        out: dict[str, float | None] = {f"p{p:g}": h.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
        out["max"] = h.get_max_value() / 1000.0
        return out

    def cpu_us_per_reading(self) -> float | None:
        """The load generator's CPU per acknowledged reading (per sent reading
        when nothing is acknowledged, as at MQTT QoS 0), in microseconds; None
        when no reading was sent or no CPU was measured."""
        readings = self.acked if self.acked else self.sent
        if not readings or not self.cpu_shares:
            return None
        return self.cpu_s * 1e6 / readings

    def steady_cpu_us_per_reading(self) -> float | None:
        """``cpu_us_per_reading`` over the steady windows (None if no window had a reading)."""
        if not self.steady_readings:
            return None
        return self.steady_cpu_s * 1e6 / self.steady_readings

    def summary(self) -> dict:
        rate = self.acked if self.acked else self.sent
        per_reading = self.cpu_us_per_reading()
        steady = self.steady_cpu_us_per_reading()
        return {
            "devices": self.devices, "connected": self.connected, "peak_connected": self.peak_connected,
            "connects": self.connects,
            "reconnects": self.reconnects, "sent": self.sent, "acked": self.acked, "errors": self.errors,
            "replayed": self.replayed, "dropped": self.dropped, "unacked_at_drop": self.unacked_at_drop,
            "behind_schedule": self.behind, "rejected": self.rejected, "commands": self.commands,
            "refusals": dict(sorted(self.refusals.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "readings_per_s": round(rate / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "latency_ms": self.latency_ms(),
            "latency_samples": self.histogram.get_total_count(),
            "loadgen_cpu_s": round(self.cpu_s, 3),
            "loadgen_cpu_us_per_reading": None if per_reading is None else round(per_reading, 3),
            "loadgen_cpu_per": "acked" if self.acked else "sent",
            "loadgen_cpu_us_per_reading_steady": None if steady is None else round(steady, 3),
            "loadgen_cpu_share_per_process": [round(x, 3) for x in self.cpu_shares],
        }

    def table(self) -> str:
        s = self.summary()
        lat = s["latency_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows = [
            ("connected", f"{s['peak_connected']} of {s['devices']} devices at peak ({s['connects']} connects, "
                          f"{s['reconnects']} reconnects)"),
            ("sent", f"{s['sent']}"), ("acked", f"{s['acked']}"),
            ("errors", f"{s['errors']}" + (f" ({s['rejected']} readings rejected)" if s["rejected"] else "")),
            *([("MQTT 5 refusals", ", ".join(f"{k}: {n}" for k, n in s["refusals"].items()))] if s["refusals"] else []),
            ("replayed / dropped", f"{s['replayed']} / {s['dropped']}"),
            ("readings/s", f"{s['readings_per_s']:.0f} ({'acked' if self.acked else 'sent'}, "
                           f"over {s['elapsed_s']:.1f} s)"),
            ("ack latency ms", " ".join(f"{k}={fmt(v)}" for k, v in lat.items())
             + f" ({s['latency_samples']} samples)"),
        ]
        if s["loadgen_cpu_us_per_reading"] is not None:
            shares = s["loadgen_cpu_share_per_process"]
            rows.append(("loadgen CPU", f"{s['loadgen_cpu_us_per_reading']:.2f} us per {s['loadgen_cpu_per']} reading "
                                        f"({s['loadgen_cpu_s']:.2f} s user+sys; "
                                        + ("" if len(shares) == 1 else f"{len(shares)} processes, busiest ")
                                        + f"{max(shares):.0%} of a core)"
                                        + ("" if s["loadgen_cpu_us_per_reading_steady"] is None else
                                           f"; {s['loadgen_cpu_us_per_reading_steady']:.2f} once all connected")))
        if s["commands"]:
            rows.insert(5, ("commands", f"{s['commands']} received and acknowledged"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cpu_bottleneck_warning(shares: list[float], busy: float = BUSY_SHARE) -> str | None:
    """A warning when the load generator is likely the bottleneck: its
    processes together used more than ``busy`` of a core each over the run
    (CPU s > busy x elapsed s x processes), or one of them did (its devices
    then waited for it). ``shares``: each process's CPU s / elapsed s."""
    if not shares:
        return None
    mean, busiest = sum(shares) / len(shares), max(shares)
    if busiest <= busy:
        return None
    where = (f"{busiest:.0%} of a core" if len(shares) == 1 else
             f"{mean:.0%} of a core per process on average over {len(shares)} processes, the busiest {busiest:.0%}")
    return (f"load generator used {where} over the run (above {busy:.0%}): it is likely the bottleneck, so the "
            f"rates describe it as much as the server; use more --procs, fewer devices, or another machine")
