"""The bench's data directories go away once counted (a gateway's spool is
about 200 MB after a few seconds of load; bench all starts about a hundred)."""

from __future__ import annotations

from pathlib import Path

from bench import procs


def test_discard_removes_the_scratch_dir_holding_a_path_and_nothing_else(tmp_path: Path) -> None:
    first, second = procs.scratch_dir("gridgate-test-scratch-"), procs.scratch_dir("gridgate-test-scratch-")
    try:
        (first / "data").mkdir()
        (first / "data" / "spool.db").write_bytes(b"x" * 1000)
        foreign = tmp_path / "mine"
        foreign.mkdir()
        procs.discard(first / "data")          # a path inside: its scratch dir goes
        procs.discard(foreign)                 # not the bench's: left alone
        procs.discard(None)
        assert not first.exists() and second.exists() and foreign.exists()
        procs.discard_all()
        assert not second.exists()
    finally:
        procs.discard_all()


def test_a_gridgate_run_leaves_no_data_dir(tmp_path: Path, monkeypatch) -> None:
    from bench import mqtt

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    run_ = mqtt._one("gridgate", 1, 0.5, None)
    assert run_["spool_records"] == run_["acked"] > 0          # counted before it went
    assert not list(tmp_path.glob("gridgate-bench-*"))
