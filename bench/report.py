"""report.md and PNG plots from a bench run's results."""
from __future__ import annotations

import os
import platform
from pathlib import Path


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


def write(results: dict, out: Path) -> str:
    lines = [f"# gridgate bench", "", f"- machine: {results['machine']}", f"- command: `{results['command']}`",
             f"- started: {results['started']}", ""]
    scenarios = results["scenarios"]
    if "pipelines" in scenarios:
        lines += _pipelines(scenarios["pipelines"], out, results["machine"])
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    return md


def _pipelines(res: dict, out: Path, machine_desc: str) -> list[str]:
    lines = ["## pipelines: HTTP std (h11) vs fast (compiled) engine", "",
             f"{res['rounds']} alternating rounds of {res['duration_s']:.0f} s; medians. One reading per request. "
             "The reference (uvicorn + httptools, same msgspec decode and compiled validator) writes nothing "
             "and does not wait for a durable commit; both gridgate engines answer after the SQLite commit.", "",
             "| driver | contender | readings/s | p50 ms | p99 ms | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for driver, per in res["summary"].items():
        for name in ("std", "fast", "reference"):
            if name in per:
                r = per[name]
                lines.append(f"| {driver} | {name} | {_fmt(r['readings_per_s'])} | {_fmt(r['p50_ms'], 2)} | "
                             f"{_fmt(r['p99_ms'], 2)} | {_fmt(r['peak_rss_mib'])} |")
    lines += ["", "| driver | fast / std readings/s | fast / std peak RSS | fast / reference readings/s |",
              "|---|---:|---:|---:|"]
    for driver, per in res["summary"].items():
        lines.append(f"| {driver} | {_fmt(per.get('fast_vs_std'), 2)}x | {_fmt(per.get('fast_vs_std_rss'), 2)}x | "
                     f"{_fmt(per.get('fast_vs_reference'), 2)}x |")
    lines.append("")
    plots = _plot_pipelines(res, out, machine_desc)
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return lines


def _plot_pipelines(res: dict, out: Path, machine_desc: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drivers = list(res["summary"])
    names = [n for n in ("std", "fast", "reference") if any(n in res["summary"][d] for d in drivers)]
    colors = {"std": "#8c8c8c", "fast": "#1f77b4", "reference": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(drivers))]
        ys = [res["summary"][d].get(name, {}).get("readings_per_s", 0) for d in drivers]
        bars = ax.bar(xs, ys, width, label=name, color=colors[name])
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(drivers))], drivers)
    ax.set_ylabel("readings/s (median of rounds)")
    ax.set_title(f"HTTP ingest throughput, one reading per request\n{machine_desc}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    bars_png = out / "pipelines_throughput.png"
    fig.savefig(bars_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for driver in drivers:
        for name in names:
            if name in res["summary"][driver]:
                r = res["summary"][driver][name]
                ax.plot(["p50", "p99"], [r["p50_ms"], r["p99_ms"]], marker="o", color=colors[name],
                        linestyle={"wrk-64": "-", "wrk-1000": "--"}.get(driver, ":"), label=f"{name} ({driver})")
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_xlabel("percentile")
    ax.set_title(f"HTTP ingest latency (answer after durable for gridgate)\n{machine_desc}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    lat_png = out / "pipelines_latency.png"
    fig.savefig(lat_png, dpi=120)
    plt.close(fig)
    return [bars_png, lat_png]
