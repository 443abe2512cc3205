"""Child processes of the supervisor that die with it.

``trio.lowlevel.open_process`` forks from a Trio worker thread, and Linux
delivers PR_SET_PDEATHSIG when the *thread* that forked the child exits,
not the process: Trio retires an idle worker thread after about 10 s, so
every worker got SIGTERM 10 s after it was spawned (and was restarted, in a
loop). Here the fork happens on the supervisor's main thread, which lives
as long as the supervisor, and the exit is awaited through a pidfd.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

__all__ = ["Child", "spawn"]

_PR_SET_PDEATHSIG = 1


def _pdeathsig_term() -> None:
    # runs in the child between fork and exec: for programs that do not set it themselves
    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Child:
    """A running child: ``pid``, ``returncode`` (None while it runs), ``wait``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)
        self._exited: trio.Event | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, signum: int) -> None:
        if self._popen.returncode is None:
            self._popen.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """The exit code (negative: the signal); any number of tasks may wait."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        if self._exited is not None:          # another task watches the pidfd (trio allows one per fd)
            await self._exited.wait()
            return self._popen.wait()
        self._exited = trio.Event()
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
            code = self._popen.wait()         # readable: it exited, this reaps it at once
        finally:
            exited, self._exited = self._exited, None
            exited.set()
        os.close(self._pidfd)
        self._pidfd = -1
        return code


def spawn(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
          new_group: bool = True, die_with_parent: bool = False, quiet: bool = False) -> Child:
    """Start ``cmd`` from this (the main) thread. ``die_with_parent``: SIGTERM
    it when this process dies, set before exec (for programs that are not
    gridgate workers, which set it themselves)."""
    out = subprocess.DEVNULL if quiet else None
    popen = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds),
                             process_group=0 if new_group else None, stdin=subprocess.DEVNULL if quiet else None,
                             stdout=out, stderr=out, preexec_fn=_pdeathsig_term if die_with_parent else None)
    return Child(popen)
