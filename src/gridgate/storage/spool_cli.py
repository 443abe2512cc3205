"""``gridgate spool stats`` and ``gridgate spool export``."""
from __future__ import annotations

import sys
from typing import TextIO

import msgspec

from gridgate.storage.spool import Spool

__all__ = ["stats_command", "export_command"]

_encode = msgspec.json.Encoder().encode


def _open(data_dir: str) -> Spool | None:
    try:
        return Spool(data_dir, readonly=True)
    except FileNotFoundError:
        print(f"gridgate: no spool in {data_dir}", file=sys.stderr)
        return None


def stats_command(data_dir: str, out: TextIO | None = None) -> int:
    """Print ``{"records": N, "rejected": M, "bytes": B}``; 1 if there is no spool."""
    spool = _open(data_dir)
    if spool is None:
        return 1
    try:
        print(_encode(spool.stats()).decode(), file=out or sys.stdout)
    finally:
        spool.close()
    return 0


def export_command(data_dir: str, *, rejected: bool = False, limit: int | None = None,
                   out: TextIO | None = None) -> int:
    """Print records (or rejections) as JSON Lines in insertion order."""
    spool = _open(data_dir)
    if spool is None:
        return 1
    out = out or sys.stdout
    try:
        rows = spool.iter_rejections(limit) if rejected else spool.iter_records(limit)
        for row in rows:
            out.write(_encode(row).decode())
            out.write("\n")
    except BrokenPipeError:  # `gridgate spool export | head`
        return 0
    finally:
        spool.close()
    return 0
