"""report.md and PNG plots from a bench run's results."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

from bench import targets


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {mem}, Linux {platform.release()}, Python {platform.python_version()}"


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _x(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


COLORS = {"std": "#8c8c8c", "fast": "#1f77b4", "reference": "#ff7f0e", "gridgate": "#1f77b4",
          "mosquitto": "#2ca02c"}
PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")
CONTENDER_LABELS = {"floor": "floor (bare Trio, no work)"}
DRIVER_LABELS = {"wrk-64": "wrk-64\n64 connections", "wrk-1000": "wrk-1000\n1,000 connections",
                 "loadgen": "loadgen\n64 devices x 4 pipelined"}


def write(results: dict, out: Path) -> str:
    lines = ["# gridgate bench", "", f"- machine: {results['machine']}", f"- command: `{results['command']}`",
             f"- started: {results['started']}",
             "- server and load generators share the machine's cores (and, on a shared machine, other work): "
             "compare the ratios within this run, not absolute numbers across runs", ""]
    scenarios = results["scenarios"]
    lines += targets.table(scenarios)
    if "pipelines" in scenarios:
        lines += _pipelines(scenarios["pipelines"], out, results["machine"])
    if "mqtt" in scenarios:
        lines += _mqtt(scenarios["mqtt"], out, results["machine"])
    if "conns" in scenarios:
        lines += _conns(scenarios["conns"], out, results["machine"])
    if "sinks" in scenarios:
        lines += _sinks(scenarios["sinks"], out, results["machine"])
    if "storm" in scenarios:
        lines += storm_table(scenarios["storm"])
    if "tls" in scenarios:
        from bench import tls  # bench.tls imports this module for profile_top

        lines += tls.table(scenarios["tls"])
    if "workers" in scenarios:
        from bench import workers

        lines += workers.table(scenarios["workers"])
    if "ws" in scenarios:
        from bench import ws

        lines += ws.table(scenarios["ws"])
    lines += _profiles(scenarios, out)
    if results.get("failed"):
        lines += ["## Failed scenarios", "", *[f"- {k}: {v[:500]}" for k, v in results["failed"].items()], ""]
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    return md


def _status(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**short**")


# -- pipelines -------------------------------------------------------------------

def _pipelines(res: dict, out: Path, machine_desc: str) -> list[str]:
    counted = [r for r in res["runs"] if not r.get("profiled")]
    lines = ["## pipelines: HTTP std (h11) vs fast (compiled) engine", "",
             f"{res['rounds']} alternating rounds of {res['duration_s']:g} s per driver; medians. One reading per "
             "request. Both gridgate engines answer 202 only after the SQLite commit (durable). The reference "
             "(uvicorn + httptools, same msgspec decode and compiled validator) writes nothing and waits for "
             "nothing, which flatters it. RSS/connection = (peak RSS under load - RSS before any connection) / "
             "connections, shown at 1,000 connections only (at 64 the load's buffers dominate it). CPU/reading = "
             "the server's user+system CPU over the run / readings answered: it moves much less than "
             "readings/s when other work takes cores away."
             + (" The floor (wrk-1000 only, bench/floor_app.py) is a bare Trio HTTP/1.1 responder: one task "
                "per connection, framing and a fixed 202, no decoding, validation or storage. Its peak RSS is the "
                "least a Trio server holds at that load; its readings/s do not compare with the others' (it does "
                "none of the work)."
                if any("floor" in per for per in res["summary"].values()) else ""), ""]
    for name, why in res.get("skipped", {}).items():
        lines += [f"- {name} skipped: {why}", ""]
    lines += ["| driver | contender | readings/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | RSS/conn KiB "
              "| CPU us/reading |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for driver, per in res["summary"].items():
        for name in ("std", "fast", "reference", "floor"):
            if name in per:
                r = per[name]
                lines.append(f"| {driver} ({r['connections']:,} conns) | {CONTENDER_LABELS.get(name, name)} | "
                             f"{_fmt(r['readings_per_s'])} | "
                             f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {_fmt(r.get('p99.9_ms'), 2)} | "
                             f"{_fmt(r['peak_rss_mib'])} | "
                             f"{_fmt(r['rss_per_conn_kb'] if r['connections'] >= 1000 else None, 1)} | "
                             f"{_fmt(r.get('cpu_us_per_reading'))} |")
    lines += ["", "| driver | fast / std readings/s | per round | fast / std per CPU-second | fast / std peak RSS "
              "| fast / reference readings/s |", "|---|---:|---|---:|---:|---:|"]
    for driver, per in res["summary"].items():
        rounds = ", ".join(f"{x:.2f}" for x in per.get("fast_vs_std_by_round", []))
        lines.append(f"| {driver} | {_x(per.get('fast_vs_std'))} | {rounds} | {_x(per.get('fast_vs_std_cpu'))} | "
                     f"{_x(per.get('fast_vs_std_rss'))} | {_x(per.get('fast_vs_reference'))} |")
    if res.get("hot_path"):
        lines += ["", "Hot path loaded: " + "; ".join(f"{k}: `{v}`" for k, v in res["hot_path"].items())]
    if res.get("spool_writer"):
        lines += ["", "Spool writer: " + "; ".join(f"{k}: `{v}`" for k, v in res["spool_writer"].items())]
    if any(r.get("non2xx") for r in counted) or any(r.get("errors") for r in counted):
        lines += ["", "Errors: " + ", ".join(f"{r['driver']} {r['contender']} round {r['round'] + 1}: "
                                              f"{r.get('non2xx', 0) or r.get('errors', 0)}"
                                              for r in counted if r.get("non2xx") or r.get("errors"))]
    lines.append("")
    plots = _plot_pipelines(res, out, machine_desc)
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return lines


def _spread(values: list[float]) -> tuple[float, float, float]:
    m = statistics.median(values)
    return m, m - min(values), max(values) - m


def _plot_pipelines(res: dict, out: Path, machine_desc: str) -> list[Path]:
    plt = _pyplot()
    drivers = list(res["summary"])
    names = [n for n in ("std", "fast", "reference") if any(n in res["summary"][d] for d in drivers)]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, d in enumerate(drivers):
            if name not in res["summary"][d]:
                continue
            m, a, b = _spread(res["summary"][d][name]["readings_per_s_runs"])
            xs.append(j + i * width)
            ys.append(m)
            lo.append(a)
            hi.append(b)
        bars = ax.bar(xs, ys, width, label=name, color=COLORS[name], yerr=[lo, hi], capsize=3,
                      error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(drivers))],
                  [DRIVER_LABELS.get(d, d) for d in drivers])
    ax.set_ylabel("readings/s (bar: median; whisker: min-max of rounds)")
    ax.yaxis.set_major_formatter(_thousands())
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.set_title("HTTP ingest throughput, one reading per request, "
                 f"{_rounds(res['rounds'])} x {res['duration_s']:g} s\n"
                 f"gridgate std (h11) vs fast (compiled) vs uvicorn+httptools reference (no durable write)\n"
                 f"{machine_desc}", fontsize=9)
    ax.legend(title="server", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    bars_png = out / "pipelines_throughput.png"
    fig.savefig(bars_png, dpi=120)
    plt.close(fig)

    lat_png = out / "pipelines_latency.png"
    _plot_percentiles(plt, [(DRIVER_LABELS.get(d, d).replace("\n", " "), res["summary"][d]) for d in drivers],
                      names, lat_png,
                      "HTTP ingest latency percentiles (gridgate answers after the durable commit; "
                      "wrk: from send, loadgen: from intended send)", machine_desc)
    return [bars_png, lat_png]


def _plot_percentiles(plt, panels: list[tuple[str, dict]], names: list[str], path: Path, title: str,
                      machine_desc: str) -> None:
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 4.2 * len(panels) + 1), 4.8), squeeze=False)
    for ax, (label, per) in zip(axes[0], panels, strict=True):
        for name in names:
            if name not in per:
                continue
            pts = [(p, per[name].get(f"{p}_ms")) for p in PERCENTILES]
            pts = [(p, v) for p, v in pts if v is not None]
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", color=COLORS[name], label=name)
        ax.set_yscale("log")
        values = [per[n].get(f"{p}_ms") for n in names if n in per for p in PERCENTILES]
        values = [v for v in values if v]
        if values:   # from one labelled tick below the data to one above it
            ax.set_ylim(_nice(min(values), math.floor), _nice(max(values), math.ceil))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency, ms (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\nmedian of rounds; {machine_desc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nice(y: float, rounding) -> float:
    """y rounded down (math.floor) or up (math.ceil) to one significant digit."""
    scale = 10 ** math.floor(math.log10(y))
    return rounding(y / scale) * scale


def _thousands():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def _rounds(n: int) -> str:
    return f"{n} round" + ("" if n == 1 else "s")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -- mqtt ------------------------------------------------------------------------

def _qos_label(key: str) -> str:
    """qos0 -> 0, qos1 -> 1, qos1_mqtt5 -> 1 (MQTT 5), fleet_qos1 -> 1 (fleet); the others are MQTT 3.1.1."""
    fleet = key.startswith("fleet_")
    qos, _, version = key.removeprefix("fleet_").partition("_")
    return qos[-1] + (" (MQTT 5)" if version == "mqtt5" else "") + (" (fleet)" if fleet else "")


def _mqtt(res: dict, out: Path, machine_desc: str) -> list[str]:
    plots = _plot_mqtt(res, out, machine_desc)
    return mqtt_tables(res) + [f"![{p.stem}]({p.name})" for p in plots] + [""]


def mqtt_tables(res: dict) -> list[str]:
    """The mqtt section of report.md without its plots (matplotlib is a [bench] extra)."""
    versions = res.get("versions", {})
    lines = ["## mqtt: gridgate vs mosquitto", "",
             f"`gridgate-loadgen mqtt --devices {res['devices']} --inflight {res['inflight']} --procs "
             f"{res['loadgen_procs']} --qos Q --duration {res['duration_s']:g}`, {res['rounds']} alternating rounds; "
             "medians. Not the same work: gridgate validates and normalizes each reading and sends its PUBACK only "
             "after the SQLite commit (WAL, synchronous=NORMAL); mosquitto"
             + (f" {versions['mosquitto']}" if versions.get("mosquitto") else "")
             + " runs without persistence and without subscribers, acking on receipt and dropping the message. "
             "At QoS 0 nothing is acknowledged: readings/s is what the load generator wrote, and gridgate's "
             "spool count shows what it stored.", ""]
    for name, why in res.get("skipped", {}).items():
        lines += [f"- {name} skipped: {why}", ""]
    lines += ["| QoS | server | readings/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | errors | drain s "
              "| spool = acked |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, per in res["summary"].items():
        for name in ("gridgate", "mosquitto"):
            if name in per:
                r = per[name]
                spool = "-"
                if "spool_records" in r:
                    spool = ("yes" if r["spool_matches_all"] else "**no**") + " (" + ", ".join(
                        f"{s:,}/{a:,}" for s, a in zip(r["spool_records"], r["acked"], strict=True)) + ")"
                lines.append(f"| {_qos_label(key)} | {name} | {_fmt(r['readings_per_s'])} | {_fmt(r['p50_ms'], 2)} | "
                             f"{_fmt(r['p99_ms'], 2)} | {_fmt(r['p99.9_ms'], 2)} | {_fmt(r['peak_rss_mib'])} | "
                             f"{r['errors']} | {_fmt(r.get('drain_s'), 1)} | {spool} |")
    ratios = [(k, per["gridgate_vs_mosquitto"]) for k, per in res["summary"].items() if "gridgate_vs_mosquitto" in per]
    if ratios:
        lines += ["", "| QoS | gridgate / mosquitto readings/s |", "|---|---:|",
                  *[f"| {_qos_label(k)} | {_x(v)} |" for k, v in ratios]]
    if any("server_cpu_us_per_reading" in per.get(n, {}) for per in res["summary"].values()
           for n in ("gridgate", "mosquitto")):
        fleet = res.get("fleet", {})
        lines += ["", f"CPU us per reading (acked; QoS 0: sent), medians: the server's process tree from /proc and "
                      "the load generator's own (over the run, and from when every device had connected). "
                      f"Fleet: {fleet.get('devices', '?')} devices x {fleet.get('inflight', '?')} in flight. "
                      "gridgate / mosquitto readings/s as the ratio of the medians and as the median of the "
                      "per-round ratios.", "",
                  "| QoS | server | readings/s | server CPU us | loadgen CPU us | loadgen once connected |",
                  "|---|---|---:|---:|---:|---:|"]
        for key, per in res["summary"].items():
            for name in ("gridgate", "mosquitto"):
                if name in per:
                    r = per[name]
                    lines.append(f"| {_qos_label(key)} | {name} | {_fmt(r['readings_per_s'])} | "
                                 f"{_fmt(r.get('server_cpu_us_per_reading'), 1)} | "
                                 f"{_fmt(r.get('loadgen_cpu_us_per_reading'), 1)} | "
                                 f"{_fmt(r.get('loadgen_cpu_us_per_reading_steady'), 1)} |")
            if per.get("gridgate_vs_mosquitto_by_round_median") is not None:
                lines.append(f"| {_qos_label(key)} | gridgate / mosquitto | {_x(per['gridgate_vs_mosquitto'])} "
                             f"(rounds: {_x(per['gridgate_vs_mosquitto_by_round_median'])}) | "
                             f"{_x(per.get('server_cpu_gridgate_vs_mosquitto'))} | | |")
    v5 = res["summary"].get("qos1_mqtt5", {})
    for name in ("gridgate", "mosquitto"):
        if f"{name}_mqtt5_vs_mqtt311" in v5:
            lines += ["", f"MQTT 5 / MQTT 3.1.1 QoS 1 readings/s through {name}: "
                          f"**{_x(v5[f'{name}_mqtt5_vs_mqtt311'])}**"
                      + (f" (target >= 0.95x: {_status(v5['gridgate_mqtt5_vs_mqtt311'] >= 0.95)})"
                         if name == "gridgate" else "")]
    lines += ["", "spool = acked: per round, readings in gridgate's spool / readings the load generator had "
                  "acknowledged (QoS 1) or sent (QoS 0). drain s: how long gridgate still had client connections "
                  "open after the load generator ended (QoS 0: still reading what the clients had written; the "
                  "server is stopped only after that, so the spool count is complete).", ""]
    return lines


def _plot_mqtt(res: dict, out: Path, machine_desc: str) -> list[Path]:
    plt = _pyplot()
    keys = list(res["summary"])
    names = [n for n in ("gridgate", "mosquitto") if any(n in res["summary"][k] for k in keys)]
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(keys):
            if name in res["summary"][k]:
                m, a, b = _spread(res["summary"][k][name]["readings_per_s_runs"])
                xs.append(j + i * width)
                ys.append(m)
                lo.append(a)
                hi.append(b)
        label = {"gridgate": "gridgate (QoS 1: acks after SQLite commit)",
                 "mosquitto": "mosquitto (no persistence, acks on receipt)"}[name]
        bars = ax.bar(xs, ys, width, label=label, color=COLORS[name], yerr=[lo, hi], capsize=3,
                      error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=8, padding=2)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))],
                  [f"QoS {_qos_label(k)}" + (" (sent, not acked)" if k == "qos0" else " (acked)") for k in keys])
    ax.set_ylabel("readings/s (bar: median; whisker: min-max of rounds)")
    ax.yaxis.set_major_formatter(_thousands())
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.set_title(f"MQTT ingest throughput: {res['devices']} devices x {res['inflight']} in flight, "
                 f"{_rounds(res['rounds'])} x {res['duration_s']:g} s\n{machine_desc}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    bars_png = out / "mqtt_throughput.png"
    fig.savefig(bars_png, dpi=120)
    plt.close(fig)
    lat_png = out / "mqtt_latency.png"
    _plot_percentiles(plt, [(f"QoS {_qos_label(k)}: publish to PUBACK", res["summary"][k]) for k in keys
                            if k != "qos0"],
                      names, lat_png,
                      "MQTT QoS 1 ack latency percentiles (from intended send)", machine_desc)
    return [bars_png, lat_png]


# -- sinks -----------------------------------------------------------------------

def _sinks(res: dict, out: Path, machine_desc: str) -> list[str]:
    lines = ["## sinks: what each sink costs", "",
             f"`gridgate-loadgen mqtt --devices 100 --inflight 10 --qos 1 --procs 2 --duration {res['duration_s']:g}` "
             "into gridgate with `--sink spool|influxdb|nats` (nats-batch: `[nats] subject = "
             f"\"telemetry.{{region}}\"`, `readings_per_message = 500`), {_rounds(res['rounds'])}, medians. "
             "A PUBACK leaves "
             "once the batch is in the sink, or pending in the spool when the sink was too slow "
             "(store-and-forward): the pending column and the drain time show whether a sink kept up.", "",
             "| sink | readings/s | x spool | p50 ms | p99 ms | pending at end | drain s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, r in res["summary"].items():
        ratio = r.get("ratio_to_spool")
        lines.append(f"| {kind} | {_fmt(r['readings_per_s'])} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {r['pending_at_end']} | {r['drain_s']:g} |")
    if res.get("skipped"):
        lines.append(f"\nSkipped (server not installed): {', '.join(res['skipped'])}.")
    plot = _plot_sinks(res, out, machine_desc)
    return lines + ["", f"![{plot.stem}]({plot.name})", ""]


def _plot_sinks(res: dict, out: Path, machine_desc: str) -> Path:
    plt = _pyplot()
    kinds = list(res["summary"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ys = [res["summary"][k]["readings_per_s"] for k in kinds]
    bars = ax.bar(kinds, ys, color=["#8c8c8c", "#1f77b4", "#2ca02c"][:len(kinds)])
    ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=8, padding=2)
    ax.set_ylabel("readings/s acknowledged (median of rounds)")
    ax.yaxis.set_major_formatter(_thousands())
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.set_title(f"MQTT QoS 1 ingest by sink (acks after durable)\n{machine_desc}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "sinks_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- conns -----------------------------------------------------------------------

def _conns(res: dict, out: Path, machine_desc: str) -> list[str]:
    s = res["summary"]
    names = [n for n in ("gridgate", "mosquitto") if n in s]
    lines = ["## conns: RSS per idle MQTT connection", "",
             f"Fresh server per level; `gridgate-loadgen mqtt --idle --devices N --procs {res['loadgen_procs']} "
             f"--source-ips {res['source_ips']} --connect-rate {res['connect_rate']}`; RSS read once the server "
             "counts all N connections and its RSS has settled. KiB/connection = (RSS at N - RSS at 0) / N. "
             f"{_rounds(res['rounds'])}, medians. For scale: a bare Trio socket with its task measured "
             f"~{res['bare_trio_kib']} KiB here; the target is {res['target_kib']:g} KiB at 15k. mosquitto is C "
             "with a small per-client struct; gridgate holds a Trio task, a socket stream and a session per "
             "connection.", ""]
    for name, why in res.get("skipped", {}).items():
        lines += [f"- {name} skipped: {why}", ""]
    head = "| connections | " + " | ".join(f"{n} RSS MiB | {n} KiB/conn" for n in names) + " |"
    lines += [head, "|---:|" + "---:|---:|" * len(names)]
    for n in res["levels"]:
        cells = []
        for name in names:
            r = s[name].get(str(n))
            cells += [_fmt(r and r["rss_mib"], 1), _fmt(r and r["per_conn_kib"], 2)]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    failed = [r for r in res["runs"] if "error" in r]
    if failed:
        lines += ["", "Failed runs (left out of the medians):", "",
                  *[f"- {r['contender']} at {r['connections']:,}, round {r['round'] + 1}: {r['error'][:300]}"
                    for r in failed]]
    rss0 = ", ".join(f"{name} {s[name][str(res['levels'][0])]['rss0_mib']:.1f} MiB" for name in names
                     if str(res["levels"][0]) in s[name])
    lines += ["", f"RSS at 0 connections: {rss0}.", ""]
    png = _plot_conns(res, out, machine_desc)
    lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def _plot_conns(res: dict, out: Path, machine_desc: str) -> Path:
    plt = _pyplot()
    s = res["summary"]
    names = [n for n in ("gridgate", "mosquitto") if n in s]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name in names:
        levels = [n for n in res["levels"] if str(n) in s[name]]
        a1.plot(levels, [s[name][str(n)]["rss_mib"] for n in levels], marker="o", color=COLORS[name], label=name)
        a2.plot(levels, [s[name][str(n)]["per_conn_kib"] for n in levels], marker="o", color=COLORS[name], label=name)
        for n in levels:
            a2.annotate(f"{s[name][str(n)]['per_conn_kib']:.2f}", (n, s[name][str(n)]["per_conn_kib"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    a2.axhline(res["target_kib"], color="#d62728", linestyle="--", linewidth=1,
               label=f"target <= {res['target_kib']:g} KiB at 15k")
    a2.axhline(res["bare_trio_kib"], color="#9467bd", linestyle=":", linewidth=1,
               label=f"bare Trio socket + task ~{res['bare_trio_kib']:g} KiB")
    a1.set_title("server RSS with N idle MQTT connections", fontsize=9)
    a1.set_ylabel("RSS, MiB")
    a2.set_title("(RSS at N - RSS at 0) / N", fontsize=9)
    a2.set_ylabel("RSS per connection, KiB")
    a2.set_ylim(0, max(a2.get_ylim()[1] * 1.1, res["target_kib"] * 1.3))
    for ax in (a1, a2):
        ax.set_xlabel("idle MQTT connections")
        ax.set_xticks(res["levels"], [f"{n:,}" for n in res["levels"]])
        ax.set_xlim(0, max(res["levels"]) * 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    a1.set_ylim(0, a1.get_ylim()[1])
    fig.suptitle(f"Memory per idle MQTT connection, gridgate vs mosquitto\n{machine_desc}", fontsize=9)
    fig.tight_layout()
    png = out / "conns_rss.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


# -- profiles --------------------------------------------------------------------

def storm_table(res: dict) -> list[str]:
    """The reconnect storm, one column per accept_rate_per_s setting (README's table too)."""
    runs = res["runs"]
    lines = ["## storm: the fleet reconnects after a gateway restart", "",
             f"{res['devices']:,} MQTT devices (`gridgate-loadgen mqtt --procs {res['loadgen_procs']} --source-ips "
             f"{res['source_ips']} --rate {res['devices'] * res['reading_rate_per_device']:g} --qos 1 --reconnect "
             f"--backoff-min {res['backoff_min_s']:g} --backoff-max {res['backoff_max_s']:g}`: a reading every "
             f"{1 / res['reading_rate_per_device']:g} s each) drop at once (SIGTERM) and reconnect to the gateway "
             "started again on the same ports and data dir. Probes: one HTTP client posting one reading at a "
             f"time ({res['http_rate']:g}/s, open loop) and {res['probe_devices']} MQTT devices "
             f"({res['probe_rate']:g} readings/s, QoS 1), connected before the fleet, measured from then until "
             f"the gateway counts every device again; at rest: {res['baseline_s']:g} s before the restart.", ""]
    ok = [r for r in runs if "error" not in r]
    if ok:
        def name(r: dict) -> str:
            rate = r["accept_rate_per_s"]
            return f"accept_rate_per_s = {rate:,.0f}" if rate else "accept_rate_per_s off"

        def secs(x) -> str:
            return "not all within the bound" if x is None else f"{x:.1f} s"

        rows = [
            ("all connected again, after SIGTERM", [secs(r["reconnect_s"]) for r in ok]),
            ("... after the new gateway listened", [secs(r["reconnect_after_ready_s"]) for r in ok]),
            ("graceful stop / restart gap", [f"{r['stop_s']:.1f} s / {r['restart_gap_s']:.1f} s" for r in ok]),
            ("HTTP client p99 in the storm (at rest)",
             [f"{_fmt(r['storm_http']['p99'], 1)} ms ({_fmt(r['rest_http']['p99'], 1)} ms)" for r in ok]),
            ("HTTP client max in the storm",
             [f"{_fmt(r['storm_http']['max'], 1)} ms ({r['storm_http']['samples']} requests)" for r in ok]),
            ("MQTT probe p99 in the storm (at rest)",
             [f"{_fmt(r['storm_mqtt']['p99'], 1)} ms ({_fmt(r['rest_mqtt']['p99'], 1)} ms)" for r in ok]),
            ("MQTT probe max in the storm",
             [f"{_fmt(r['storm_mqtt']['max'], 1)} ms ({r['storm_mqtt']['samples']} readings)" for r in ok]),
            ("gateway peak RSS after the restart (before)",
             [f"{r['peak_rss_kb'] / 1024:,.0f} MiB ({r['peak_rss_before_kb'] / 1024:,.0f} MiB)" for r in ok]),
            ("gridgate_accept_errors after the restart (before)",
             [f"{r['accept_errors']} ({r['accept_errors_before']})" for r in ok]),
            ("fleet connects / reconnects / errors",
             [f"{r['fleet']['connects']:,} / {r['fleet']['reconnects']:,} / {r['fleet']['errors']:,}" for r in ok]),
            ("fleet readings replayed / dropped",
             [f"{r['fleet']['replayed']:,} / {r['fleet']['dropped']:,}" for r in ok]),
            ("spool records >= acked (fleet and probes)",
             [f"{r['spool_records']:,} >= {r['acked_total']:,}: {'yes' if r['nothing_lost'] else '**NO**'}"
              for r in ok]),
        ]
        lines += ["| | " + " | ".join(name(r) for r in ok) + " |", "|---|" + "---:|" * len(ok),
                  *[f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows], ""]
        warned = [(name(r), w) for r in ok for w in r.get("fleet_warnings", [])]
        if warned:
            lines += ["Load generator warnings:", "", *[f"- {n}: {w}" for n, w in warned], ""]
    for r in runs:
        if "error" in r:
            lines += [f"- accept_rate_per_s = {r['accept_rate_per_s']:g} FAILED: {r['error'][:500]}", ""]
    return lines


def profile_top(speedscope: Path, n: int = 8) -> tuple[int, list[tuple[str, float, float]]]:
    """Samples, and the top functions by own (leaf) share with their total
    (inclusive) share, from a py-spy speedscope file."""
    doc = json.loads(speedscope.read_text())
    frames = doc["shared"]["frames"]

    def label(i: int) -> str:
        f = frames[i]
        file = f.get("file") or ""
        short = "/".join(Path(file).parts[-2:]) if file else "?"
        return f"{f['name']} ({short})"

    own: dict[str, float] = {}
    incl: dict[str, float] = {}
    total = 0
    for profile in doc["profiles"]:
        for sample in profile["samples"]:  # one per sample (weights are seconds)
            weight = 1
            total += weight
            if sample:
                leaf = label(sample[-1])
                own[leaf] = own.get(leaf, 0) + weight
            for name in {label(i) for i in sample}:
                incl[name] = incl.get(name, 0) + weight
    top = sorted(own, key=own.get, reverse=True)[:n]
    return total, [(name, own[name] / total, incl[name] / total) for name in top] if total else []


def _profiles(scenarios: dict, out: Path) -> list[str]:
    lines: list[str] = []
    for scen in scenarios.values():
        for r in scen.get("runs", []):
            prof = r.get("profile")
            if not prof:
                continue
            what = f"{scen['scenario']} {targets.load_label(r)}"
            svg, ss = Path(prof["flamegraph_svg"]), Path(prof["speedscope_json"])
            svg_rel, ss_rel = os.path.relpath(svg, out), os.path.relpath(ss, out)
            total, top = profile_top(ss)
            lines += [f"### {what} ({r['readings_per_s']:,.0f} readings/s while profiled, {total:,} samples)", "",
                      f"flame graph [{svg_rel}]({svg_rel}), speedscope [{ss_rel}]({ss_rel}) "
                      "(open at https://www.speedscope.app)", "",
                      "| function (own time, leaf) | own | total |", "|---|---:|---:|",
                      *[f"| `{name}` | {a:.1%} | {b:.1%} |" for name, a, b in top], ""]
    if lines:
        lines = ["## py-spy profiles (extra runs, not counted in the tables above)", "",
                 "Python frames only: time in compiled code (the Cython extension, msgspec, sqlite3) shows "
                 "under the Python function that called it.", ""] + lines
    return lines
