"""``python -m bench workers`` (and ``mqtt --workers 1,2``) at a small scale:
gridgate with 1 and 2 workers (and mosquitto, when installed) on loopback,
1 s of QoS 1 each and 100 idle connections per worker. Checks what the
table is made of: every acked reading stored, the whole process tree's CPU
and RSS measured, the ratios computed."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import procs, workers  # noqa: E402
from bench.__main__ import SCENARIOS, _workers_list  # noqa: E402
from binaries import require  # noqa: E402


def test_workers_is_a_registered_scenario_and_takes_its_counts():
    assert "workers" in SCENARIOS
    assert _workers_list("1,2") == (1, 2)
    for bad in ("2,1", "0,1", "1,1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _workers_list(bad)


def test_tree_pids_sees_a_supervisors_workers_and_private_nats(tmp_path):
    require("nats-server")
    server = procs.gridgate_workers(2, data_dir=tmp_path / "d")
    try:
        pids = procs.tree_pids(server.pid)
        # the supervisor, 2 workers, the private nats-server
        assert len(pids) >= 4, pids
        assert server.rss_kb() > procs.rss_kb(server.pid)
    finally:
        assert server.stop() == 0


def test_a_small_workers_run_measures_both_counts(tmp_path):
    require("nats-server")
    lines: list[str] = []
    res = workers.run(1.0, 1, tmp_path, False, log=lines.append, workers=(1, 2), idle_per_worker=100)
    names = {r["contender"] for r in res["runs"]}
    assert {"gridgate-w1", "gridgate-w2"} <= names
    for r in res["runs"]:
        assert r["acked"] > 0 and r["errors"] == 0, r
        assert r["server_cpu_us"] > 0 and r["loadgen_cpu_us"] is not None
        if r["contender"].startswith("gridgate"):
            assert r["spool_matches"], r
    idle = res["summary"]["idle"]
    assert idle["gridgate-w1"]["connections"] == 100 and idle["gridgate-w2"]["connections"] == 200
    assert all(i["per_conn_kib"] > 0 for i in idle.values())
    assert res["summary"]["cpu_growth"] > 0 and res["summary"]["rss_growth"] > 0
    md = "\n".join(workers.table(res))
    assert "| gridgate-w2 |" in md and "workers / 1:" in md
