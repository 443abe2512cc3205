"""The private ``nats-server`` of ``gridgate serve --workers N`` without
``[cluster] nats_servers``: the workers of one box are a cluster too (a
device that reconnects lands on any worker: takeover and command routing
must span them), and NATS is the one engine gridgate clusters over.

It listens on a loopback port only, has no JetStream and no persistence
(the bus carries presence, which the workers re-announce), and runs as the
supervisor's child: restarted on the same port if it dies, stopped after
the workers.
"""
from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from pathlib import Path

import trio

from gridgate.cluster.children import Child, spawn

__all__ = ["PrivateNats", "NatsNotInstalled", "find_nats_server"]

log = logging.getLogger("gridgate.cluster")

READY_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class NatsNotInstalled(Exception):
    def __str__(self) -> str:
        return ("--workers N > 1 runs the workers as one cluster over NATS: install nats-server "
                "(apt-get install nats-server) or set [cluster] nats_servers")


def find_nats_server() -> str:
    path = shutil.which("nats-server")
    if path is None:
        raise NatsNotInstalled()
    return path


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateNats:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_loopback_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gridgate-nats-"))
        self.proc: Child | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _spawn(self) -> Child:
        proc = spawn([self.binary, "-a", "127.0.0.1", "-p", str(self.port), "--no_advertise",
                      "-l", str(self.dir / "nats-server.log")], die_with_parent=True, quiet=True)
        with trio.move_on_after(READY_TIMEOUT_S):
            while proc.poll() is None:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return proc
        proc.kill()
        tail = (self.dir / "nats-server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the private nats-server did not listen on 127.0.0.1:{self.port}:\n{tail}")

    async def run(self, *, task_status: trio.TaskStatus[PrivateNats] = trio.TASK_STATUS_IGNORED) -> None:
        """Start it, report started, and keep it running until cancelled."""
        self.proc = await self._spawn()
        log.info("private nats-server for the workers' cluster on %s (pid %d)", self.url, self.proc.pid)
        task_status.started(self)
        deaths = 0
        try:
            while True:
                code = await self.proc.wait()
                if self._stopping:
                    return
                wait = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S) - 1)]
                deaths += 1
                log.warning("private nats-server died (exit %s); restarting it in %gs on the same port", code, wait)
                await trio.sleep(wait)
                self.proc = await self._spawn()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
