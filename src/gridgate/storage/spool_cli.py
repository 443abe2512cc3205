"""``gridgate spool stats`` and ``gridgate spool export``.

Given the data dir of ``gridgate serve --workers N``, they read every shard
(``<data_dir>/worker-<i>/``, and the data dir's own spool if a single
gateway used it before): stats summed, with each shard's own under
``"shards"``; export concatenated, shard after shard.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import msgspec

from gridgate.storage.spool import SPOOL_FILE, Spool

__all__ = ["stats_command", "export_command"]

_encode = msgspec.json.Encoder().encode


# the shards of gridgate.cluster (its SHARD_PREFIX; storage may not import it)
_SHARD = re.compile(r"worker-(\d+)")


def shards(data_dir: str) -> list[tuple[str, Path]]:
    """(name, directory) of every spool under ``data_dir``: its own ("."), then
    ``worker-<i>`` in the order of i."""
    top = Path(data_dir)
    found: list[tuple[str, Path]] = []
    if (top / SPOOL_FILE).exists():
        found.append((".", top))
    numbered: list[tuple[int, Path]] = []
    if top.is_dir():
        for child in top.iterdir():
            m = _SHARD.fullmatch(child.name)
            if m and (child / SPOOL_FILE).exists():
                numbered.append((int(m.group(1)), child))
    found.extend((path.name, path) for _, path in sorted(numbered))
    return found


def _open(data_dir: str) -> Spool | None:
    try:
        return Spool(data_dir, readonly=True)
    except FileNotFoundError:
        print(f"gridgate: no spool in {data_dir}", file=sys.stderr)
        return None


def stats_command(data_dir: str, out: TextIO | None = None) -> int:
    """Print ``{"records": N, "rejected": M, "pending": P, "bytes": B}``, summed
    over the shards of ``--workers N`` (each under ``"shards"``); 1 if there is no spool."""
    found = shards(data_dir)
    if not found or found == [(".", Path(data_dir))]:
        spool = _open(data_dir)
        if spool is None:
            return 1
        try:
            print(_encode(spool.stats()).decode(), file=out or sys.stdout)
        finally:
            spool.close()
        return 0
    total: dict[str, int] = {"records": 0, "rejected": 0, "pending": 0, "bytes": 0}
    per_shard: dict[str, dict[str, int]] = {}
    for name, path in found:
        spool = Spool(path, readonly=True)
        try:
            per_shard[name] = spool.stats()
        finally:
            spool.close()
        for key, value in per_shard[name].items():
            total[key] = total.get(key, 0) + value
    print(_encode({**total, "shards": per_shard}).decode(), file=out or sys.stdout)
    return 0


def _rows(paths: list[Path], rejected: bool, limit: int | None) -> Iterator[dict[str, object]]:
    left = limit
    for path in paths:
        if left is not None and left <= 0:
            return
        spool = Spool(path, readonly=True)
        try:
            for row in (spool.iter_rejections(left) if rejected else spool.iter_records(left)):
                if left is not None:
                    left -= 1
                yield row
        finally:
            spool.close()


def export_command(data_dir: str, *, rejected: bool = False, limit: int | None = None,
                   out: TextIO | None = None) -> int:
    """Print records (or rejections) as JSON Lines in insertion order; over
    the shards of ``--workers N``, shard after shard (``--limit`` counts them all)."""
    paths = [path for _, path in shards(data_dir)]
    if not paths:
        print(f"gridgate: no spool in {data_dir}", file=sys.stderr)
        return 1
    out = out or sys.stdout
    try:
        for row in _rows(paths, rejected, limit):
            out.write(_encode(row).decode())
            out.write("\n")
    except BrokenPipeError:  # `gridgate spool export | head`
        return 0
    return 0
