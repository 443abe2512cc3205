"""``gridgate serve --workers N``: one supervisor, N gateway processes on the
same ports (SO_REUSEPORT), one spool shard each (DESIGN section 12)."""
from __future__ import annotations

__all__ = ["SHARD_PREFIX", "shard_dir"]

# <data_dir>/worker-<i>/: worker i's spool; `gridgate spool stats|export`
# given <data_dir> reads every shard (gridgate.storage.spool_cli).
SHARD_PREFIX = "worker-"


def shard_dir(data_dir: str, index: int) -> str:
    import os

    return os.path.join(data_dir, f"{SHARD_PREFIX}{index}")
