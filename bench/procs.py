"""Servers and load drivers the system benchmarks start themselves, on free
loopback ports: gridgate (either HTTP engine), mosquitto, the uvicorn +
httptools reference app, the bare Trio floor app, gridgate-loadgen and wrk;
plus RSS and py-spy."""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WRK_SCRIPT = ROOT / "bench" / "wrk_post.lua"
_LISTENING = re.compile(r"listening (.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant (a supervisor's workers, its private nats-server)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                pass
    return out


class Server:
    """A server child process with its address, peak RSS and optional py-spy.

    ``tree``: RSS and CPU are summed over the process and its descendants
    (``gridgate serve --workers N``)."""

    tree = False

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None,
                 address: tuple[str, int] | None = None, ready_timeout: float = 30.0) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.address = address
        self.profiler: subprocess.Popen | None = None
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = _LISTENING.search(line)
                if m:
                    for part in m.group(1).split():
                        key, _, hp = part.partition("=")
                        host, _, port = hp.rpartition(":")
                        self.addresses[key] = (host, int(port))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if address is None:
            if not ready.wait(ready_timeout) or not self.addresses:
                self.stop()
                raise RuntimeError(f"{name} did not start: " + "\n".join(self.lines[-20:]))
        else:
            self._wait_port(address, ready_timeout)

    def _wait_port(self, address: tuple[str, int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: " + "\n".join(self.lines[-20:]))
            try:
                socket.create_connection(address, timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {address}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pids(self) -> list[int]:
        return tree_pids(self.pid) if self.tree else [self.pid]

    def peak_rss_kb(self) -> int:
        return sum(rss_kb(p, "VmHWM") for p in self._pids())

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self._pids())

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self._pids())

    def profile(self, out_dir: Path, label: str, duration: float) -> None:
        """py-spy record this server for `duration` s, into OUT/LABEL.svg (flame
        graph) and OUT/LABEL.speedscope.json. py-spy writes one format per
        recorder, so two recorders sample the same pid at once; both use
        --nonblocking (the server is never paused) and the speedscope one keeps
        full file names so bench.perfcheck can tell stdlib json from others."""
        spy = py_spy()
        out_dir.mkdir(parents=True, exist_ok=True)
        self._profile_files = {"flamegraph_svg": out_dir / f"{label}.svg",
                               "speedscope_json": out_dir / f"{label}.speedscope.json"}
        common = [spy, "record", "--pid", str(self.pid), "--duration", str(max(1, int(round(duration)))),
                  "--nonblocking"]
        self._profilers = [
            subprocess.Popen(common + ["--rate", "100", "--format", "flamegraph",
                                       "--output", str(self._profile_files["flamegraph_svg"])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
            subprocess.Popen(common + ["--rate", "200", "--format", "speedscope", "--full-filenames",
                                       "--output", str(self._profile_files["speedscope_json"])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        ]
        self.profiler = self._profilers[0]

    def finish_profile(self) -> dict[str, str] | None:
        """Wait for the recorders; the files they wrote (checked to exist and
        to parse), plus folded stacks (``a;b;c count``) for greps. None when
        this server was not profiled."""
        if self.profiler is None:
            return None
        errors = []
        for p in self._profilers:
            try:
                _, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"py-spy exited {p.returncode}: {err.strip()[-1000:]}")
        self.profiler = None
        files = self._profile_files
        for path in files.values():
            if not path.exists() or path.stat().st_size == 0:
                errors.append(f"py-spy wrote no {path.name}")
        if errors:
            raise RuntimeError(f"profiling {self.name} failed: " + "; ".join(errors))
        if b"<svg" not in files["flamegraph_svg"].read_bytes()[:4096]:
            raise RuntimeError(f"{files['flamegraph_svg']} is not an SVG file")
        collapsed = files["speedscope_json"].with_name(files["speedscope_json"].name.replace(
            ".speedscope.json", ".collapsed.txt"))
        speedscope_to_collapsed(files["speedscope_json"], collapsed)  # also proves the JSON parses
        return {k: str(v) for k, v in {**files, "collapsed": collapsed}.items()}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


INSTALL_HINT = "pip install -e '.[bench]'"
# Python modules of the [bench] extra each scenario needs: every scenario
# writes PNG plots (matplotlib); pipelines also runs the uvicorn + httptools
# + uvloop reference (python -m uvicorn in this interpreter).
SCENARIO_MODULES = {"pipelines": ("matplotlib", "uvicorn", "httptools", "uvloop"), "mqtt": ("matplotlib",),
                    "workers": (), "conns": ("matplotlib",), "sinks": ("matplotlib",), "tls": ("cryptography",),
                    "ws": ()}


def _py_spy_path(which=shutil.which) -> str | None:
    spy = which("py-spy") or str(BIN / "py-spy")
    return spy if Path(spy).exists() else None


def missing_bench_dependencies(scenarios: list[str], profile: bool, find_spec=importlib.util.find_spec,
                               which=shutil.which) -> list[str]:
    """What the [bench] extra should have installed and `scenarios` (with
    --profile: py-spy too) would fail on, in order; empty when all is there.
    Asked before any server starts, so a missing plotting library does not
    surface after a whole scenario's run."""
    needed = [m for name in scenarios for m in SCENARIO_MODULES.get(name, ())]
    missing = []
    for module in dict.fromkeys(needed):
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):     # a broken install, or a module with no spec
            found = False
        if not found:
            missing.append(module)
    if profile and _py_spy_path(which) is None:
        missing.append("py-spy")
    return missing


def py_spy() -> str:
    spy = _py_spy_path()
    if spy is None:
        raise RuntimeError(f"py-spy is not installed ({INSTALL_HINT})")
    return spy


def speedscope_to_collapsed(src: Path, collapsed: Path) -> dict[str, int]:
    """Folded stacks (``root;...;leaf count``, root first) from a py-spy
    speedscope file; returned and written to `collapsed`."""
    doc = json.loads(src.read_text())
    frames = [f["name"] + (f" ({f['file']}:{f.get('line', 0)})" if f.get("file") else "")
              for f in doc["shared"]["frames"]]
    counts: dict[str, int] = {}
    for profile in doc["profiles"]:
        for sample in profile["samples"]:  # counted one each (py-spy's weights are seconds)
            key = ";".join(frames[i] for i in sample)
            counts[key] = counts.get(key, 0) + 1
    collapsed.write_text("".join(f"{k} {v}\n" for k, v in sorted(counts.items())))
    return counts


# Data directories of the servers a run starts: a gateway's spool holds about
# 200 MB after a few seconds of load, and bench all starts about a hundred, so
# each is removed once its run is counted (discard), the rest when the scenario
# ends (discard_all) or the process exits.
_SCRATCH: set[Path] = set()


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory that :func:`discard` or :func:`discard_all` (at the latest, exit) removes."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _SCRATCH.add(path)
    return path


def discard(path: Path | None) -> None:
    """Remove a directory :func:`scratch_dir` made (or one inside it); any other path is left alone."""
    if path is None:
        return
    owner = next((d for d in _SCRATCH if path == d or d in path.parents), None)
    if owner is not None:
        shutil.rmtree(owner, ignore_errors=True)
        _SCRATCH.discard(owner)


def discard_all() -> None:
    for path in list(_SCRATCH):
        discard(path)


atexit.register(discard_all)


def gridgate(engine: str = "fast", mqtt: bool = False, extra_env: dict[str, str] | None = None,
             data_dir: Path | None = None) -> Server:
    data_dir = data_dir or scratch_dir("gridgate-bench-")
    cmd = [str(BIN / "gridgate"), "serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0" if mqtt else "",
           "--ws", "", "--http-engine", engine, "--data-dir", str(data_dir)]
    env = {"ENVIRONMENT": "bench", "SERVICE_NAME": "gridgate-bench", **(extra_env or {})}
    server = Server(f"gridgate-{engine}", cmd, env)
    server.data_dir = data_dir
    return server


def gridgate_workers(workers: int, data_dir: Path | None = None, ready_timeout: float = 90.0) -> Server:
    """``gridgate serve --workers N`` (MQTT and HTTP), measured as a process
    tree; ready once the supervisor says every worker is up (N > 1)."""
    if workers == 1:
        server = gridgate(mqtt=True, data_dir=data_dir)
        server.tree = True
        return server
    data_dir = data_dir or scratch_dir("gridgate-bench-")
    cmd = [str(BIN / "gridgate"), "serve", "--workers", str(workers), "--http", "127.0.0.1:0",
           "--mqtt", "127.0.0.1:0", "--ws", "", "--data-dir", str(data_dir)]
    server = Server(f"gridgate-w{workers}", cmd, {"ENVIRONMENT": "bench", "SERVICE_NAME": "gridgate-bench"},
                    ready_timeout=ready_timeout)
    deadline = time.monotonic() + ready_timeout
    while not any("supervisor pid" in line for line in list(server.lines)):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"gridgate --workers {workers} did not start: " + "\n".join(server.lines[-20:]))
        time.sleep(0.05)
    server.tree = True
    server.data_dir = data_dir
    return server


def reference_app() -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.reference_app:app", "--host", "127.0.0.1", "--port", str(port),
           "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
           "--backlog", "4096"]
    return Server("uvicorn-httptools", cmd, {"PYTHONPATH": str(ROOT)}, address=("127.0.0.1", port))


def floor_app() -> Server:
    """The bare Trio responder of bench/floor_app.py: the RSS floor of a Trio
    server, not a contender."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.floor_app", "--port", str(port)]
    return Server("floor", cmd, {"PYTHONPATH": str(ROOT)}, address=("127.0.0.1", port))


def mosquitto_path() -> str | None:
    exe = shutil.which("mosquitto")
    if exe is None and Path("/usr/sbin/mosquitto").exists():
        exe = "/usr/sbin/mosquitto"
    return exe


def gridgate_and_mosquitto(log) -> tuple[list[str], dict[str, str]]:
    """The MQTT contenders of a run, and why one was skipped (mosquitto not installed)."""
    if mosquitto_path() is None:
        skipped = {"mosquitto": "not installed (apt-get install mosquitto); gridgate measured alone"}
        log(f"  mosquitto skipped: {skipped['mosquitto']}")
        return ["gridgate"], skipped
    return ["gridgate", "mosquitto"], {}


def mqtt_contender(name: str) -> Server:
    """Start an MQTT contender of the mqtt and conns benches: gridgate or mosquitto."""
    if name == "gridgate":
        return gridgate(mqtt=True)
    server = mosquitto()
    assert server is not None, "mosquitto is not installed (gridgate_and_mosquitto skips it)"
    return server


def mqtt_address(server: Server) -> tuple[str, int]:
    """Where an MQTT contender listens: mosquitto's chosen port, gridgate's logged one."""
    return server.address or server.addresses["mqtt"]


def mosquitto_version() -> str | None:
    exe = mosquitto_path()
    if exe is None:
        return None
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
    m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def mosquitto() -> Server | None:
    """mosquitto on a free port, no persistence (it acks QoS 1 on receipt);
    None when it is not installed."""
    exe = mosquitto_path()
    if exe is None:
        return None
    port = free_port()
    conf = Path(tempfile.mkdtemp(prefix="mosquitto-bench-")) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                    "max_connections -1\nlog_type error\n")
    return Server("mosquitto", [exe, "-c", str(conf)], address=("127.0.0.1", port))


def socket_count(pid: int) -> int:
    """Open sockets of a process (listeners included), from /proc/PID/fd."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except FileNotFoundError:
        pass
    return n


def gridgate_connections(http: tuple[str, int], protocol: str = "mqtt") -> int:
    """gridgate's own count of open `protocol` connections, from GET
    /v1/connections (whose total would include the asking HTTP connection)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{http[0]}:{http[1]}/v1/connections", timeout=5) as resp:
        return int(json.loads(resp.read())["by_protocol"].get(protocol, 0))


def spool_records(data_dir: Path) -> int:
    out = subprocess.run([str(BIN / "gridgate"), "spool", "stats", "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ENVIRONMENT": "bench", "SERVICE_NAME": "gridgate-bench"})
    return json.loads(out.stdout)["records"] if out.returncode == 0 else -1


def loadgen(protocol: str, target: tuple[str, int], duration: float, **opts) -> dict:
    """Run gridgate-loadgen and return its --json result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    cmd = [str(BIN / "gridgate-loadgen"), protocol, "--target", f"{target[0]}:{target[1]}",
           "--duration", str(duration), "--json", out_json, *loadgen_flags(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration * 4 + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr[-2000:]}")
    result = json.loads(Path(out_json).read_text())
    os.unlink(out_json)
    result.pop("histogram", None)
    return result


def loadgen_flags(opts: dict) -> list[str]:
    """gridgate-loadgen's command-line flags for keyword options: True is the
    bare flag, False its ``--no-`` form (``mux=False`` is ``--no-mux``: the
    CLI's on-by-default switches are ``BooleanOptionalAction``; dropping it
    would silently keep the default), None leaves the option out, and 0 is
    a value (``--qos 0``)."""
    flags: list[str] = []
    for key, value in opts.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append("--" + name)
        elif value is False:
            flags.append("--no-" + name)
        elif value is not None:
            flags += ["--" + name, str(value)]
    return flags


def wrk(target: tuple[str, int], duration: float, connections: int, threads: int = 1,
        readings: int = 1) -> dict | None:
    """Run wrk with the POST script: requests/s, readings/s, latency, non-2xx."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    proc = subprocess.run([exe, "-t", str(threads), "-c", str(connections), "-d", f"{int(round(duration))}s",
                           "--timeout", "10s", "-s", str(WRK_SCRIPT), f"http://{target[0]}:{target[1]}/"],
                          capture_output=True, text=True, timeout=duration * 3 + 60,
                          env={**os.environ, "READINGS": str(readings)})
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stderr[-2000:]}")
    text = proc.stdout
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text.split("WRK_COUNTS", 1)[1].splitlines()[0])}
    lat = {k: int(v) / 1000 for k, v in re.findall(r"(\w+)=(\d+)", text.split("WRK_LATENCY_US", 1)[1].splitlines()[0])}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    return {"requests_per_s": rps, "readings_per_s": rps * readings, "sent": counts["sent"],
            "answered": counts["answered"], "non2xx": counts["non2xx"],
            "socket_errors": "Socket errors" in text,
            "latency_ms": {"p50": lat["p50"], "p90": lat["p90"], "p99": lat["p99"], "p99.9": lat["p999"],
                           "max": lat["max"]}}
