"""Open-file and port budgets: say before connecting when N cannot fit."""
from __future__ import annotations

import ipaddress
import math
import resource

__all__ = ["raise_open_file_limit", "parse_ip_range", "check_capacity", "FD_RESERVE", "PORTS_PER_SOURCE"]

FD_RESERVE = 64
# Linux's default ephemeral range 32768-60999: connections from one source
# address to one target address and port.
PORTS_PER_SOURCE = 28_000


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def parse_ip_range(text: str) -> tuple[str, ...]:
    """``127.0.0.2-127.0.0.20`` -> every address in the range (loopback only)."""
    first, sep, last = text.partition("-")
    try:
        a = ipaddress.IPv4Address(first.strip())
        b = ipaddress.IPv4Address((last if sep else first).strip())
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"--source-ips {text!r}: {exc}") from None
    if int(b) < int(a):
        raise ValueError(f"--source-ips {text!r}: the range ends before it starts")
    if not (a.is_loopback and b.is_loopback):
        raise ValueError(f"--source-ips {text!r}: only loopback addresses (127.0.0.0/8) are allowed")
    if int(b) - int(a) >= 65536:
        raise ValueError(f"--source-ips {text!r}: more than 65536 addresses")
    return tuple(str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1))


def check_capacity(devices: int, procs: int, fd_limit: int, sources: int) -> list[str]:
    """Problems that make the run impossible, in words a user can act on."""
    problems = []
    per_proc = math.ceil(devices / procs)
    usable = fd_limit - FD_RESERVE
    if per_proc > usable:
        need = math.ceil(devices / usable)
        problems.append(f"{devices} devices over {procs} process(es) is {per_proc} sockets per process, but one "
                        f"process may open {fd_limit} files ({usable} after a reserve of {FD_RESERVE}): "
                        f"use --procs {need} or more")
    ports = PORTS_PER_SOURCE * max(sources, 1)
    if devices > ports:
        problems.append(f"{devices} connections to one target need more than {ports} source ports: spread them "
                        f"with --source-ips over at least {math.ceil(devices / PORTS_PER_SOURCE)} loopback addresses")
    return problems
