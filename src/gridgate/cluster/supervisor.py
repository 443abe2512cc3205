"""The supervisor of ``gridgate serve --workers N``.

It serves nothing itself. It reserves the listeners' ports, starts N
``gridgate serve`` workers that bind them with SO_REUSEPORT, restarts one that
dies (with backoff), forwards SIGHUP to all, and on SIGTERM/SIGINT forwards
the signal, waits for every worker's graceful stop and exits 0.

Ephemeral ports (port 0): the supervisor binds first. Its sockets have
SO_REUSEPORT and are bound but never listen, so the kernel hands them no
connection, yet they hold the port for the supervisor's whole life: every
worker, and a worker restarted after all others died, binds the same
concrete port. (Letting worker 0 pick the port would lose it when worker 0
dies while the others are down, and would start the workers one by one.)
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio
from prometheus_client import multiprocess

from gridgate.cluster import shard_dir
from gridgate.cluster.children import Child, spawn
from gridgate.cluster.private_nats import NatsNotInstalled, PrivateNats, find_nats_server
from gridgate.config import Config, parse_address
from gridgate.gateway import DRAIN_TIMEOUT_S, ListenError

__all__ = ["supervise", "LISTENERS", "BACKOFF_MIN_S", "BACKOFF_MAX_S", "STABLE_S"]

log = logging.getLogger("gridgate.cluster")

# listener name -> (config section, key); the names of the `listening` line
LISTENERS: dict[str, tuple[str, str]] = {
    "mqtt": ("mqtt", "listen"), "http": ("http", "listen"), "ws": ("websocket", "listen"),
    "mqtts": ("mqtt", "tls_listen"), "https": ("http", "tls_listen"), "wss": ("websocket", "tls_listen"),
}

# Restart backoff per worker: 0.5 s, doubled after each death up to 30 s;
# back to 0.5 s once a worker has served STABLE_S. Fast enough that devices
# reconnecting with their own backoff barely notice one crash, slow enough
# that a worker crashing at start (a full disk, a bad certificate) does not
# spin a core and flood the log.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0
# a worker that has not bound its listeners by then is killed and counted as dead
START_TIMEOUT_S = 60.0
# after SIGTERM a worker drains (DRAIN_TIMEOUT_S) then writes what is queued
# (DRAIN_TIMEOUT_S more); past this the supervisor kills what is left
STOP_TIMEOUT_S = 2 * DRAIN_TIMEOUT_S + 15.0


class WorkerStartError(Exception):
    def __init__(self, index: int, code: int | None) -> None:
        super().__init__(f"worker-{index} did not start ({describe_exit(code)})")
        self.index = index
        self.code = code


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def reserve_ports(config: Config) -> tuple[dict[str, str], list[socket.socket]]:
    """Bind (not listen) every enabled listener's address with SO_REUSEPORT.

    Returns the concrete ``HOST:PORT`` per listener name for the workers, and
    the sockets to keep open. Raises ListenError for an address in use by
    another program (or another user's), as a lone gateway would.
    """
    sections = {"mqtt": config.mqtt, "http": config.http, "websocket": config.websocket}
    addresses: dict[str, str] = {}
    held: list[socket.socket] = []
    try:
        for name, (section, key) in LISTENERS.items():
            parsed = parse_address(getattr(sections[section], key))
            if parsed is None:
                continue
            host, port = parsed
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                for family, type_, proto, _, sockaddr in infos:
                    sock = socket.socket(family, type_, proto)
                    held.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    # port 0: the first address picks the port, the others of the same host take it too
                    sock.bind((sockaddr[0], port, *sockaddr[2:]))
                    port = sock.getsockname()[1]
            except OSError as exc:
                raise ListenError(name, f"{host}:{port}", exc) from exc
            addresses[name] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return addresses, held


@dataclass
class _Slot:
    index: int
    proc: Child | None = None
    stop_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config, argv: list[str], workers: int, addresses: dict[str, str],
                 metrics_dir: str) -> None:
        self.config = config
        # prometheus-client's multiprocess mode: each worker's values in files
        # here, /metrics on any worker sums them (gridgate.observability.metrics)
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        self.metrics_dir = metrics_dir
        self.argv = argv
        self.addresses = addresses
        self.slots = [_Slot(i) for i in range(workers)]
        # the private nats-server to start for the workers' cluster (none when [cluster] nats_servers is set)
        self.nats_binary: str | None = None
        self._stop = trio.Event()
        self._all_stopped = trio.Event()
        self._running = workers

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _command(self, index: int, ready_fd: int) -> list[str]:
        # The user's own arguments, so a worker reads the config (file,
        # environment, flags) as a lone gateway would, on start and on
        # SIGHUP; the flags after them win (argparse keeps the last).
        cmd = [sys.executable, "-m", "gridgate.cli", *self.argv, "--workers", "1",
               "--worker-index", str(index), "--worker-of", str(os.getpid()), "--ready-fd", str(ready_fd),
               "--data-dir", shard_dir(self.config.spool.data_dir, index)]
        for name, address in self.addresses.items():
            cmd += ["--listen", f"{name}={address}"]
        return cmd

    async def _spawn(self, slot: _Slot) -> tuple[Child, bool]:
        """Start worker ``slot.index``; True once it reports its listeners bound,
        False when it exits (or hangs past START_TIMEOUT_S) before that."""
        read_fd, write_fd = os.pipe()
        try:
            proc = spawn(self._command(slot.index, write_fd), pass_fds=(write_fd,), env=self.env)
        finally:
            os.close(write_fd)
        slot.proc = proc
        if self.stopping():             # the stop was forwarded while this one was being started
            proc.send_signal(signal.SIGTERM)
        async with trio.lowlevel.FdStream(read_fd) as ready:
            with trio.move_on_after(START_TIMEOUT_S):
                return proc, await ready.receive_some(1) == b"1"
        log.error("worker-%d (pid %d) did not bind its listeners within %.0fs: killing it",
                  slot.index, proc.pid, START_TIMEOUT_S)
        proc.kill()
        return proc, False

    async def _run_slot(self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._keep_running(slot, task_status)
        finally:
            self._running -= 1
            if self._running == 0:
                self._all_stopped.set()

    async def _keep_running(self, slot: _Slot, task_status: trio.TaskStatus[None]) -> None:
        backoff = BACKOFF_MIN_S
        first = True
        while not self.stopping():
            proc, ready = await self._spawn(slot)
            started = trio.current_time()
            if first:
                if not ready:
                    raise WorkerStartError(slot.index, await proc.wait())
                task_status.started()
                first = False
            elif ready:
                log.info("worker-%d restarted (pid %d)", slot.index, proc.pid)
            code = await proc.wait()
            slot.proc = None
            # its live gauges (connections, queue) leave the sums; its counters stay in them
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping():
                slot.stop_codes.append(code)
                return
            if trio.current_time() - started >= STABLE_S:
                backoff = BACKOFF_MIN_S
            log.warning("worker-%d (pid %d) died (%s) after %.1fs; restarting it in %.1fs", slot.index, proc.pid,
                        describe_exit(code), trio.current_time() - started, backoff)
            with trio.move_on_after(backoff):
                await self._stop.wait()
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                try:
                    slot.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as outer:
                if self.nats_binary is not None:
                    nats = await outer.start(PrivateNats(self.nats_binary).run)
                    self.env["GRIDGATE_CLUSTER_NATS_SERVERS"] = nats.url
                code = await self._run_workers(signals)
                outer.cancel_scope.cancel()          # the private nats-server goes after the workers
        return code

    async def _run_workers(self, signals: AsyncIterator[int]) -> int:
        async with trio.open_nursery() as nursery:
            failed = await self._start_all(nursery)
            if failed is None:
                log.info("listening %s workers=%d", " ".join(f"{k}={v}" for k, v in self.addresses.items()),
                         len(self.slots))
                log.info("supervisor pid %d; %s; data_dir=%s (one spool shard per worker: worker-<i>/)",
                         os.getpid(), ", ".join(f"worker-{s.index} pid {s.proc.pid}" for s in self.slots
                                                if s.proc is not None), self.config.spool.data_dir)
                await self._watch_signals(signals, nursery)
            else:
                log.error("%s: stopping the others", failed)
                self._stop.set()
                self._signal_all(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT_S):
                    for slot in self.slots:
                        if slot.proc is not None:   # the slot's own task may wait too: trio serializes
                            await slot.proc.wait()
                nursery.cancel_scope.cancel()
        if failed is not None:
            return failed.code if failed.code is not None and failed.code > 0 else 1
        unclean = [(s.index, c) for s in self.slots for c in s.stop_codes
                   if c not in (0, -signal.SIGTERM, -signal.SIGINT)]
        for index, code in unclean:
            log.error("worker-%d stopped with %s", index, describe_exit(code))
        log.info("stopped: %d workers", len(self.slots))
        return 1 if unclean else 0

    async def _start_all(self, nursery: trio.Nursery) -> WorkerStartError | None:
        """Start every worker at once; the first that could not start, if any
        (the others are up then, or failed too)."""
        failures: list[WorkerStartError] = []

        async def start_one(slot: _Slot) -> None:
            try:
                await nursery.start(self._run_slot, slot)
            except WorkerStartError as exc:
                failures.append(exc)

        async with trio.open_nursery() as starting:
            for slot in self.slots:
                starting.start_soon(start_one, slot)
        return min(failures, key=lambda f: f.index) if failures else None

    async def _watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        count = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("received SIGHUP: forwarding it to %d workers", len(self.slots))
                self._signal_all(signum)
                continue
            count += 1
            self._signal_all(signum)
            if count == 1:
                log.info("received %s: stopping the %d workers gracefully (send it again to stop them at once)",
                         name, len(self.slots))
                self._stop.set()
                nursery.start_soon(self._kill_after_timeout)
                nursery.start_soon(self._end_watch_when_done, nursery)
            else:
                log.warning("received %s again: the workers stop now", name)

    async def _end_watch_when_done(self, nursery: trio.Nursery) -> None:
        # the slots return once their worker exited; then nothing is left to watch
        await self._all_stopped.wait()
        nursery.cancel_scope.cancel()

    async def _kill_after_timeout(self) -> None:
        await trio.sleep(STOP_TIMEOUT_S)
        log.error("workers still running %.0fs after the stop: killing them", STOP_TIMEOUT_S)
        self._signal_all(signal.SIGKILL)


def supervise(config: Config, argv: list[str], workers: int) -> int:
    """Run the supervisor until SIGTERM/SIGINT; the process's exit code."""
    nats_binary = None
    if not config.cluster.nats_servers:
        try:
            nats_binary = find_nats_server()
        except NatsNotInstalled as exc:
            log.error("%s", exc)
            return 2
    try:
        addresses, held = reserve_ports(config)
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    # fresh each start: files of an earlier run would be summed into the counters
    metrics_dir = tempfile.mkdtemp(prefix="gridgate-metrics-")
    try:
        supervisor = Supervisor(config, argv, workers, addresses, metrics_dir)
        supervisor.nats_binary = nats_binary
        return trio.run(supervisor.run)
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
