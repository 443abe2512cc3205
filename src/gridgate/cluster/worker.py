"""What a worker process does differently from a lone ``gridgate serve``."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

__all__ = ["die_with_parent", "log_format", "notify_ready"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this worker when its supervisor dies, even by SIGKILL: the
    workers run in their own process group (so a terminal's Ctrl-C reaches
    only the supervisor, which forwards it once), so nothing else would stop
    them, and an orphan would keep the ports and its shard open."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:          # not Linux/glibc: the supervisor's stop is all there is
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def log_format(index: int) -> str:
    """The log line of worker ``index``: its number and pid before the message."""
    return f"%(asctime)s %(levelname)s %(name)s worker-{index}[%(process)d]: %(message)s"


def notify_ready(fd: int) -> None:
    """Tell the supervisor every listener is bound (one byte on its pipe)."""
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
