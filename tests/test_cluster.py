"""``gridgate serve --workers N`` with real processes and clients on loopback
(gridgate.cluster; DESIGN section 12): a supervisor, N workers on the same
SO_REUSEPORT ports, one spool shard each."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gatewayproc import BIN, gridgate_env, run_cli, spool_export, spool_stats

_SUPERVISOR_LISTENING = re.compile(r"supervisor\[\d+\]: listening (.*) workers=(\d+)$")
_WORKER_PIDS = re.compile(r"worker-(\d+) pid (\d+)")
_PRIVATE_NATS = re.compile(r"private nats-server for the workers' cluster on \S+ \(pid (\d+)\)")


class Cluster:
    """A ``gridgate serve --workers N`` child; ready once the supervisor's listening line is out."""

    def __init__(self, data_dir: Path, workers: str = "2", *args: str, start_timeout: float = 60.0) -> None:
        self.data_dir = data_dir
        cmd = [str(BIN), "serve", "--workers", workers, "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0",
               "--ws", "127.0.0.1:0", "--data-dir", str(data_dir), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=gridgate_env())
        self.lines: list[str] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self.workers = 0
        self.pids: dict[int, int] = {}
        self.nats_pid = 0
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                line = line.rstrip("\n")
                self.lines.append(line)
                m = _SUPERVISOR_LISTENING.search(line)
                nats = _PRIVATE_NATS.search(line)
                if nats:
                    self.nats_pid = int(nats.group(1))
                if m:
                    for part in m.group(1).split():
                        name, _, addr = part.partition("=")
                        host, _, port = addr.rpartition(":")
                        self.addresses[name] = (host.strip("[]"), int(port))
                    self.workers = int(m.group(2))
                elif "supervisor pid" in line and not ready.is_set():
                    self.pids = {int(i): int(p) for i, p in _WORKER_PIDS.findall(line)}
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(start_timeout) or not self.addresses:
            self.kill()
            raise RuntimeError("gridgate --workers did not start:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in list(self.lines) if (m := re.search(pattern, line))]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} lines matching {pattern!r} within {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._pump.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._pump.join(5)


@pytest.fixture
def cluster(tmp_path):
    procs: list[Cluster] = []

    def start(workers: str = "2", *args: str) -> Cluster:
        c = Cluster(tmp_path / "data", workers, *args)
        procs.append(c)
        return c

    yield start
    for c in procs:
        c.kill()
        # the workers die with the supervisor (PR_SET_PDEATHSIG); none may outlive a test
        for pid in c.pids.values():
            _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _post(addr: tuple[str, int], body: dict[str, object]) -> int:
    """One reading on a connection of its own (so each lands where the kernel puts it)."""
    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        conn.request("POST", "/v1/telemetry", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _metrics(addr: tuple[str, int], name: str) -> float:
    """The sum of /metrics samples ``name{...}`` (or ``name``), on a connection of its own."""
    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200, text
    finally:
        conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def _publish_once(addr: tuple[str, int], cid: str, count: int) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
    client.connect(*addr, keepalive=30)
    client.loop_start()
    try:
        infos = [client.publish(f"devices/{cid}/telemetry", json.dumps({"battery_mv": 3000 + n, "seq": n}), qos=1)
                 for n in range(count)]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_two_workers_share_the_ports_and_each_keeps_a_shard(cluster, tmp_path):
    c = cluster("2")
    assert c.workers == 2 and sorted(c.pids) == [0, 1]
    # every log line of a worker names it and its pid
    for index, pid in c.pids.items():
        assert any(f"worker-{index}[{pid}]: listening mqtt=" in line for line in c.lines), c.log()

    for i in range(40):
        assert _post(c.addresses["http"], {"device_id": f"http-{i:02d}", "battery_mv": 3700}) == 202
    threads = [threading.Thread(target=_publish_once, args=(c.addresses["mqtt"], f"meter-{i:02d}", 10))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    # /metrics on whichever worker answers: the sum over both (each alone has only its share)
    for _ in range(10):
        assert _metrics(c.addresses["http"], "gridgate_readings_accepted_total") == 240
        assert _metrics(c.addresses["http"], "gridgate_connections_opened_total") >= 60

    # SIGHUP reaches every worker (each re-reads the config)
    c.proc.send_signal(signal.SIGHUP)
    reloaded = c.wait_for_line(r"worker-(\d)\[\d+\]: SIGHUP: reloaded", count=2)
    assert {m.group(1) for m in reloaded} == {"0", "1"}

    assert c.stop() == 0
    for pid in c.pids.values():
        assert _wait_gone(pid, 5)
    stats = spool_stats(c.data_dir)
    assert stats["records"] == 40 + 20 * 10
    assert set(stats["shards"]) == {"worker-0", "worker-1"}
    # 60 connections spread by the kernel's hash of the 4-tuple: both got some
    # (all on one worker would be a chance of 2**-59)
    assert stats["shards"]["worker-0"]["records"] > 0 and stats["shards"]["worker-1"]["records"] > 0
    assert sum(s["records"] for s in stats["shards"].values()) == stats["records"]
    assert (c.data_dir / "worker-0" / "spool.sqlite3").exists()
    rows = spool_export(c.data_dir)
    assert len(rows) == 240
    expected = {f"http-{i:02d}" for i in range(40)} | {f"meter-{i:02d}" for i in range(20)}
    assert {r["device_id"] for r in rows} == expected
    limited = run_cli("spool", "export", "--data-dir", str(c.data_dir), "--limit", "5")
    assert limited.returncode == 0 and len(limited.stdout.splitlines()) == 5
    # each worker's last line counts what it wrote; together: everything
    written = [int(m.group(1)) for m in c.wait_for_line(r"worker-\d\[\d+\]: stopped: (\d+) readings written",
                                                          count=2)]
    assert sum(written) == 240 and min(written) > 0


def test_kill_9_of_a_worker_mid_stream_loses_no_acked_reading(cluster):
    c = cluster("2")
    host, port = c.addresses["mqtt"]
    stop = threading.Event()
    sent: dict[str, list[paho.MQTTMessageInfo]] = {}
    errors: list[str] = []
    connects: list[str] = []
    devices = 16

    def device(cid: str) -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
        client.reconnect_delay_set(min_delay=0.1, max_delay=1)   # paho's loop reconnects on its own
        client.on_connect = lambda *_: connects.append(cid)
        infos = sent.setdefault(cid, [])
        try:
            client.connect(host, port, keepalive=30)
            client.loop_start()
            seq = 0
            while not stop.is_set():
                info = client.publish(f"devices/{cid}/telemetry",
                                      json.dumps({"battery_mv": 3000 + seq % 1000, "seq": seq}), qos=1)
                infos.append(info)
                seq += 1
                if info.rc != paho.MQTT_ERR_SUCCESS:       # disconnected just now: retry soon
                    time.sleep(0.05)
                    continue
                try:
                    info.wait_for_publish(timeout=1)
                except (RuntimeError, ValueError):
                    time.sleep(0.05)
            # a last chance for acks still in flight
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(i.rc == 0 and not i.is_published() for i in infos[-50:]):
                time.sleep(0.05)
            client.disconnect()
            client.loop_stop()
        except Exception as exc:  # collected and asserted below
            errors.append(f"{cid}: {exc!r}")

    def acked(cid: str) -> set[int]:
        # rc > 0: publish() found the client disconnected; not counted as acked whatever follows
        return {n for n, info in enumerate(list(sent.get(cid, []))) if info.rc == 0 and info.is_published()}

    threads = [threading.Thread(target=device, args=(f"meter-{i:02d}",)) for i in range(devices)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(len(acked(f"meter-{i:02d}")) >= 20 for i in range(devices)):
            time.sleep(0.1)
        assert all(len(acked(f"meter-{i:02d}")) >= 20 for i in range(devices)), "devices did not get going"

        victim = c.pids[1]
        os.kill(victim, signal.SIGKILL)
        died = c.wait_for_line(rf"worker-1 \(pid {victim}\) died \(killed by SIGKILL\) .* restarting it in")
        assert died
        restarted = c.wait_for_line(r"worker-1 restarted \(pid (\d+)\)")[0]
        new_pid = int(restarted.group(1))
        assert new_pid != victim
        before = {f"meter-{i:02d}": len(sent[f"meter-{i:02d}"]) for i in range(devices)}
        # every device gets acks again after the restart (those of the dead worker reconnected)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                max(acked(cid), default=-1) >= before[cid] + 10 for cid in before):
            time.sleep(0.1)
        assert all(max(acked(cid), default=-1) >= before[cid] + 10 for cid in before), \
            {cid: (before[cid], max(acked(cid), default=-1)) for cid in before}
        # new connections reach the restarted worker too
        for i in range(30):
            assert _post(c.addresses["http"], {"device_id": f"http-{i:02d}", "battery_mv": 3700}) == 202
        # the summed counters keep what the killed worker counted
        acked_now = sum(len(acked(cid)) for cid in sent)
        assert _metrics(c.addresses["http"], "gridgate_readings_accepted_total") >= acked_now + 30
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    # the kill cut live connections: their devices connected again (16 on one worker: a chance of 2**-16)
    assert len(connects) > devices
    assert c.stop() == 0

    stored: dict[str, set[int]] = {}
    for row in spool_export(c.data_dir):
        if row["device_id"].startswith("meter-"):
            stored.setdefault(row["device_id"], set()).add(int(row["fields"]["seq"]))
    missing = {cid: sorted(lost)[:10] for cid in sent if (lost := acked(cid) - stored.get(cid, set()))}
    assert missing == {}
    assert sum(len(acked(cid)) for cid in sent) > devices * 30
    # the restarted worker served and wrote some of them
    written = c.wait_for_line(rf"worker-1\[{new_pid}\]: stopped: (\d+) readings written")[0]
    assert int(written.group(1)) > 0


def test_a_worker_dying_again_waits_longer(cluster):
    c = cluster("2")
    victim = c.pids[0]
    os.kill(victim, signal.SIGKILL)
    first = c.wait_for_line(r"worker-0 restarted \(pid (\d+)\)")[0]
    os.kill(int(first.group(1)), signal.SIGKILL)
    c.wait_for_line(r"worker-0 restarted \(pid (\d+)\)", count=2)
    waits = [m.group(1) for m in c.wait_for_line(r"worker-0 \(pid \d+\) died .* restarting it in ([\d.]+)s", count=2)]
    assert waits == ["0.5", "1.0"]
    assert c.stop() == 0


def test_one_worker_is_a_plain_gateway(cluster, tmp_path):
    proc = subprocess.Popen([str(BIN), "serve", "--workers", "1", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0",
                             "--ws", "", "--data-dir", str(tmp_path / "one")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=gridgate_env())
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and " listening " not in line:
            line = proc.stderr.readline()
        assert " listening " in line and "workers=" not in line and "supervisor" not in line
        http_addr = re.search(r"http=([\d.]+):(\d+)", line)
        assert http_addr
        assert _post((http_addr.group(1), int(http_addr.group(2))), {"device_id": "m", "battery_mv": 3700}) == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # today's layout: the spool in the data dir itself, no shards
    assert (tmp_path / "one" / "spool.sqlite3").exists() and not (tmp_path / "one" / "worker-0").exists()
    assert spool_stats(tmp_path / "one")["records"] == 1


def test_a_port_in_use_stops_the_start_with_the_listener_named(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        out = subprocess.run([str(BIN), "serve", "--workers", "2", "--mqtt", f"127.0.0.1:{port}",
                              "--http", "127.0.0.1:0", "--ws", "", "--data-dir", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=60, env=gridgate_env())
    finally:
        taken.close()
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on mqtt 127.0.0.1:{port}" in out.stderr
    assert "worker-0" not in out.stderr     # refused before any worker started


def test_bad_workers_value_is_a_config_error():
    for value in ("zero", "0"):
        out = run_cli("serve", "--workers", value)
        assert out.returncode == 2 and "service.workers" in out.stderr, out.stderr


def test_workers_from_the_environment(tmp_path):
    env = gridgate_env(GRIDGATE_SERVICE_WORKERS="2")
    proc = subprocess.Popen([str(BIN), "serve", "--mqtt", "", "--http", "127.0.0.1:0", "--ws", "",
                             "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 60
        line = "-"
        while time.monotonic() < deadline and line and not ("supervisor" in line and " listening " in line):
            line = proc.stderr.readline()        # "" at EOF: it exited
        assert " listening " in line and line.rstrip().endswith("workers=2"), line
        proc.send_signal(signal.SIGINT)          # Ctrl-C: as SIGTERM
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_worker_that_cannot_start_stops_the_start_with_its_exit_code(tmp_path):
    # Config.load accepts this file (the supervisor's own check); the password
    # file is read by each worker's gateway, which refuses it: exit 2
    (tmp_path / "pw").write_text("garbage line without colon\n")
    (tmp_path / "bad.toml").write_text(f'[auth]\npassword_file = "{tmp_path / "pw"}"\n')
    out = subprocess.run([str(BIN), "serve", "--config", str(tmp_path / "bad.toml"), "--workers", "2",
                          "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ws", "",
                          "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=120, env=gridgate_env())
    assert out.returncode == 2, out.stderr
    assert "not 'id:hash'" in out.stderr
    assert re.search(r"worker-\d did not start \(exit code 2\): stopping the others", out.stderr), out.stderr
    assert " listening " not in out.stderr


def test_workers_do_not_outlive_a_killed_supervisor(cluster):
    c = cluster("2")
    c.proc.kill()                              # no chance to forward anything
    c.proc.wait(10)
    # PR_SET_PDEATHSIG: each worker gets SIGTERM and stops on its own
    assert all(_wait_gone(pid, 30) for pid in c.pids.values())
    # and neither does the private nats-server of their cluster
    assert _wait_gone(c.nats_pid, 30)


def test_workers_outlive_the_thread_that_started_them(cluster):
    """Regression: the workers were forked from a Trio worker thread, and
    PR_SET_PDEATHSIG fires when that thread ends (Trio retires idle threads
    after 10 s): every worker was SIGTERMed 10 s after its start, then
    restarted, forever. Now the supervisor forks from its main thread."""
    c = cluster("2")
    before = dict(c.pids)
    time.sleep(12)                              # past Trio's 10 s idle-thread timeout
    assert not [line for line in c.lines if "died" in line or "received SIGTERM" in line], c.log()
    assert all(_alive(pid) for pid in before.values())
    assert c.stop() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_are_one_cluster_commands_reach_a_device_on_any_worker(cluster):
    c = cluster("2")
    c.wait_for_line(r"cluster: node \S+ joined over NATS", count=2)
    c.wait_for_line(r"cluster: node \S+ joined \(", count=2)    # each has heard the other
    got: dict[str, list[bytes]] = {}
    clients = []
    for i in range(8):
        cid = f"meter-{i}"
        got[cid] = []
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
        client.on_message = lambda cl, u, msg, cid=cid: got[cid].append(msg.payload)
        subscribed = threading.Event()
        client.on_subscribe = lambda *a, ev=subscribed: ev.set()
        client.connect(*c.addresses["mqtt"], keepalive=30)
        client.loop_start()
        client.subscribe(f"devices/{cid}/commands", qos=1)
        assert subscribed.wait(10)
        clients.append(client)
    try:
        for cid in got:
            # each POST on a connection of its own: the kernel puts it on either worker
            deadline = time.monotonic() + 15
            while True:
                conn = http.client.HTTPConnection(*c.addresses["http"], timeout=10)
                conn.request("POST", f"/v1/devices/{cid}/commands", json.dumps({"type": "ping"}),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                # 404 only until the other worker has heard the device's bind
                if resp.status == 202 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert resp.status == 202, cid
        deadline = time.monotonic() + 15
        while not all(got.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(len(v) == 1 for v in got.values()), got
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
    assert c.stop() == 0


def test_workers_without_nats_server_exit_2_saying_what_to_install(tmp_path):
    env = gridgate_env(PATH="/nonexistent")
    out = subprocess.run([str(BIN), "serve", "--workers", "2", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0",
                          "--ws", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert "install nats-server (apt-get install nats-server) or set [cluster] nats_servers" in out.stderr
