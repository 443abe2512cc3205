"""How the pipelines bench shares the machine between wrk and the server
(issue 24): wrk on one CPU, the server's threads on the others, and each
side's CPU recorded. Real processes: a child started inside the pinned
block, and the bare Trio floor app as the server."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import pipelines, procs  # noqa: E402

needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to split")


def _allowed(pid: int | str) -> set[int]:
    return os.sched_getaffinity(int(pid))


@needs_two
def test_the_split_gives_the_driver_one_cpu_and_the_server_the_rest():
    split = pipelines.cpu_split()
    assert split is not None
    driver, server = split
    assert len(driver) == 1 and driver.isdisjoint(server) and driver | server == os.sched_getaffinity(0)


@needs_two
def test_a_driver_started_in_the_pinned_block_runs_on_its_cpu_and_the_bench_gets_its_cpus_back():
    before = os.sched_getaffinity(0)
    driver, _ = pipelines.cpu_split()
    with pipelines._pinned(driver):
        out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == str(sorted(driver))
    assert os.sched_getaffinity(0) == before


@needs_two
def test_every_thread_of_the_server_is_pinned():
    _, cpus = pipelines.cpu_split()
    server = procs.floor_app()
    try:
        pipelines.pin_process(server, cpus)
        tids = os.listdir(f"/proc/{server.pid}/task")
        assert tids and all(_allowed(tid) == cpus for tid in tids)
    finally:
        server.stop()


def test_the_summary_carries_both_sides_cpu():
    runs = [{"driver": "wrk-64", "contender": name, "connections": 64, "readings_per_s": rps, "peak_rss_kb": 50_000,
             "idle_rss_kb": 40_000, "cpu_us_per_reading": cpu, "client_cpu_us_per_reading": client,
             "server_cores": 0.9, "client_cores": 0.2, "latency_ms": {"p50": 1.0}}
            for name, rps, cpu, client in (("fast", 13_000.0, 50.0, 12.0), ("reference", 10_000.0, 65.0, 13.0))]
    per = pipelines.summarize(runs, ("fast", "reference"))["wrk-64"]
    assert per["fast"]["client_cpu_us_per_reading"] == 12.0 and per["reference"]["server_cores"] == 0.9
    assert per["fast_vs_reference"] == pytest.approx(1.3)
