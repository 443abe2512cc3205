"""Real ``nats-server`` processes for tests: one JetStream node, or a three-node
JetStream cluster, on free loopback ports, each with its own store directory.

Readiness is the server's own monitoring endpoint: ``/healthz`` answers 200
once the client listener is up and JetStream is usable (for a cluster node
that includes having a meta leader), so a test never races the server. Each
start is bounded by a deadline and fails with the tail of the server's log.

A node keeps its ports and store directory across ``kill()`` (SIGKILL, no
graceful shutdown: what a crash or the OOM killer does) and ``restart()``, so
clients reconnect to the same address and JetStream recovers the same store.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["NATS_SERVER", "NatsServer", "NatsCluster", "free_port", "free_ports"]

NATS_SERVER = shutil.which("nats-server")
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    Each is found by binding port 0; all sockets stay open until every port is
    chosen, or the kernel could hand out the same port twice. nats-server's own
    random port (``-1``) cannot be used: a restarted node must come back on the
    same port, and cluster routes must be known before any node starts.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class NatsServer:
    """One ``nats-server -js`` process (optionally a cluster node).

    ``cluster`` is ``(cluster_name, cluster_port, [route ports of every node])``.
    """

    def __init__(self, work_dir: Path, *, name: str = "n1", port: int | None = None,
                 http_port: int | None = None, cluster: tuple[str, int, list[int]] | None = None) -> None:
        if NATS_SERVER is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.name = name
        self.dir = Path(work_dir) / name
        self.store_dir = self.dir / "store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "nats-server.log"
        self.conf_path = self.dir / "nats-server.conf"
        if port is None or http_port is None:
            port, http_port = free_ports(2)
        self.port = port
        self.http_port = http_port
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None
        self._write_conf()

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def _write_conf(self) -> None:
        lines = [
            f"server_name: {self.name}",
            f'listen: "{HOST}:{self.port}"',
            f'http: "{HOST}:{self.http_port}"',
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.cluster is not None:
            cluster_name, cluster_port, route_ports = self.cluster
            routes = ", ".join(f'"nats-route://{HOST}:{p}"' for p in route_ports)
            lines += [
                "cluster {",
                f"  name: {cluster_name}",
                f'  listen: "{HOST}:{cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle --------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process without waiting (a cluster starts all nodes, then waits)."""
        if self.running():
            raise RuntimeError(f"nats-server {self.name} is already running")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([NATS_SERVER, "-js", "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll ``/healthz`` until 200, the process dies, or the deadline passes."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"nats-server {self.name} exited (status {code}) before it was ready\n"
                                   f"{self.log_tail()}")
            try:
                status, body = _http_get(f"http://{HOST}:{self.http_port}/healthz")
                if status == 200:
                    return
                last = f"/healthz {status} {body[:200]!r}"
            except OSError as e:
                last = f"/healthz: {e}"
            if time.monotonic() >= deadline:
                raise RuntimeError(f"nats-server {self.name} not ready after {timeout:.0f}s ({last})\n"
                                   f"{self.log_tail()}")
            self._wait_exit(0.05)   # between polls, wake at once if the server dies

    def _wait_exit(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the process to exit (the poll loops' pause)."""
        try:
            assert self.proc is not None
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye to clients or peers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self, timeout: float = 15.0) -> NatsServer:
        """Start again on the same ports and store directory (kills first if needed)."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it lingers; for fixture teardown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def jsz(self) -> dict:
        """The monitoring ``/jsz`` document (JetStream state, meta cluster)."""
        status, body = _http_get(f"http://{HOST}:{self.http_port}/jsz")
        if status != 200:
            raise RuntimeError(f"/jsz on {self.name}: HTTP {status}")
        return json.loads(body)

    def client_connections(self) -> int:
        """How many clients the node holds (``num_connections`` of its ``/connz``)."""
        status, body = _http_get(f"http://{HOST}:{self.http_port}/connz")
        if status != 200:
            raise RuntimeError(f"/connz on {self.name}: HTTP {status}")
        return int(json.loads(body)["num_connections"])

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """Three (or ``size``) JetStream nodes routed to each other on loopback.

    Node names are ``n1``..``nN`` (``server_name``, which JetStream clustering
    requires); each has its own client, route and monitoring ports and its
    own store directory.
    """

    def __init__(self, work_dir: Path, size: int = 3, name: str = "gridgate-test") -> None:
        ports = free_ports(3 * size)     # client, monitoring, route per node, all distinct
        client, http, route = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.nodes = [NatsServer(work_dir, name=f"n{i + 1}", port=client[i], http_port=http[i],
                                 cluster=(name, route[i], route))
                      for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> NatsServer:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.spawn()
        try:
            for n in self.nodes:
                n.wait_ready(max(0.1, deadline - time.monotonic()))
            self.wait_meta_leader(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_meta_leader(self, timeout: float = 15.0) -> str:
        """Until every live node agrees on a JetStream meta leader and sees all peers."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                live = [n for n in self.nodes if n.running()]
                leaders = set()
                for n in live:
                    meta = n.jsz().get("meta_cluster") or {}
                    leaders.add(meta.get("leader") or "")
                    if meta.get("cluster_size") != len(self.nodes):
                        leaders.add("")
                if len(leaders) == 1 and "" not in leaders:
                    return leaders.pop()
                last = f"meta leaders seen: {sorted(leaders)}"
            except (OSError, RuntimeError, ValueError) as e:
                last = str(e)
            running = next((n for n in self.nodes if n.running()), None)
            if time.monotonic() >= deadline or running is None:
                tails = "\n".join(n.log_tail(15) for n in self.nodes)
                why = "every node has exited" if running is None else f"no meta leader after {timeout:.0f}s"
                raise RuntimeError(f"JetStream cluster: {why} ({last})\n{tails}")
            running._wait_exit(0.05)   # pause between polls of the monitoring endpoint

    def kill(self, name: str) -> NatsServer:
        node = self.node(name)
        node.kill()
        return node

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
