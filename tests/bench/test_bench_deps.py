"""`python -m bench` checks its optional [bench] dependencies before it
starts anything: a missing one ends the run at once, naming it and the
install command, instead of failing after a whole scenario."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import procs  # noqa: E402


def fake_find_spec(installed: set[str]):
    def find_spec(name: str):
        return object() if name in installed else None
    return find_spec


def no_which(name: str) -> None:
    return None


ALL_MODULES = {"matplotlib", "uvicorn", "httptools", "uvloop"}


@pytest.mark.parametrize("scenarios, installed, missing", [
    (["pipelines", "mqtt", "conns", "sinks"], ALL_MODULES, []),
    (["pipelines", "mqtt", "conns", "sinks"], set(), ["matplotlib", "uvicorn", "httptools", "uvloop"]),
    (["pipelines"], {"matplotlib", "uvicorn", "uvloop"}, ["httptools"]),
    # only pipelines runs the uvicorn + httptools reference; every scenario plots
    (["mqtt"], {"matplotlib"}, []),
    (["mqtt", "conns", "sinks"], {"uvicorn", "httptools", "uvloop"}, ["matplotlib"]),
])
def test_each_scenario_needs_its_modules(scenarios, installed, missing, monkeypatch):
    monkeypatch.setattr(procs, "BIN", Path("/nonexistent"))
    assert procs.missing_bench_dependencies(scenarios, False, fake_find_spec(installed), no_which) == missing


def test_py_spy_is_needed_only_with_profile(monkeypatch, tmp_path):
    monkeypatch.setattr(procs, "BIN", tmp_path)      # no py-spy next to the interpreter either
    find = fake_find_spec(ALL_MODULES)
    assert procs.missing_bench_dependencies(["mqtt"], False, find, no_which) == []
    assert procs.missing_bench_dependencies(["mqtt"], True, find, no_which) == ["py-spy"]
    assert procs.missing_bench_dependencies(["mqtt"], True, fake_find_spec(set()), no_which) == [
        "matplotlib", "py-spy"]
    # on PATH, or in the virtualenv's bin
    spy = tmp_path / "py-spy"
    spy.write_text("")
    assert procs.missing_bench_dependencies(["mqtt"], True, find, lambda name: str(spy)) == []
    assert procs.missing_bench_dependencies(["mqtt"], True, find, no_which) == []


def test_a_broken_install_counts_as_missing(monkeypatch):
    def find_spec(name: str):
        if name == "uvicorn":
            raise ImportError("half-installed")
        if name == "httptools":
            raise ValueError("httptools.__spec__ is None")
        return object()
    assert procs.missing_bench_dependencies(["pipelines"], False, find_spec, no_which) == ["uvicorn", "httptools"]


# In a child interpreter: sys.modules[name] = None hides an installed module
# from both `import name` and importlib.util.find_spec.
HIDE_AND_RUN = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.path.insert(0, sys.argv[2])
from bench.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def run_bench(tmp_path: Path, hidden: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_AND_RUN, hidden, str(ROOT), *args,
                           "--out", str(tmp_path / "out"), "--duration", "1", "--rounds", "1"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_missing_matplotlib_stops_the_run_before_any_scenario(tmp_path):
    started = time.monotonic()
    out = run_bench(tmp_path, "matplotlib", "mqtt")
    assert out.returncode == 2, out.stderr
    assert "missing matplotlib" in out.stderr
    assert "pip install -e '.[bench]'" in out.stderr
    # nothing was started or written: no scenario header, no output directory
    assert out.stdout == ""
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 30


def test_all_names_every_missing_module_at_once(tmp_path):
    out = run_bench(tmp_path, "matplotlib,uvicorn,httptools,uvloop", "all")
    assert out.returncode == 2
    # 'all' profiles by default: py-spy is named too where it is not installed
    assert "missing matplotlib, uvicorn, httptools, uvloop" in out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()


def test_loadgen_flags_are_what_the_loadgen_cli_parses() -> None:
    """The bench's keyword options become flags gridgate-loadgen's own
    parser reads back as the same settings: 0 is a value, None is left out,
    True is a switch and False its ``--no-`` form (dropped, ``mux=False``
    would silently keep the mux)."""
    from loadgen.cli import build_parser

    flags = procs.loadgen_flags({"devices": 3, "inflight": 2, "qos": 0, "mqtt_version": None, "mux": False,
                                 "reconnect": False, "idle": True})
    assert "--mqtt-version" not in flags
    args = build_parser().parse_args(["mqtt", "--target", "127.0.0.1:1883", "--duration", "1", *flags])
    assert (args.devices, args.inflight, args.qos, args.mux, args.reconnect, args.idle) == (3, 2, 0, False, False,
                                                                                          True)
    default = build_parser().parse_args(["mqtt", "--target", "127.0.0.1:1883", "--duration", "1",
                                         *procs.loadgen_flags({"devices": 3})])
    assert (default.mux, default.reconnect, default.idle) == (True, True, False)
