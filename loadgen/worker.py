"""A loadgen worker process (``--procs``): runs its share of the fleet and
reports to the parent on stdout, one line a second and one at the end.

    S <stats wire>   progress (counters and histogram so far)
    F <stats wire>   final
    W <json list>    self-check warnings
"""
from __future__ import annotations

import json
import sys

import trio

from loadgen.device import DeviceOptions
from loadgen.runner import RunPlan, SelfCheck, run_share
from loadgen.stats import Stats


def plan_from_json(text: str) -> RunPlan:
    data = json.loads(text)
    data["device"] = DeviceOptions(**data["device"])
    data["source_ips"] = tuple(data["source_ips"])
    return RunPlan(**data)


def main() -> None:
    from loadgen.limits import raise_open_file_limit

    raise_open_file_limit()
    plan = plan_from_json(sys.argv[1])
    stats = Stats()
    check = SelfCheck()

    def tick() -> None:
        print("S " + stats.to_wire(), flush=True)

    trio.run(run_share, plan, stats, check, tick)
    print("W " + json.dumps(check.warnings()), flush=True)
    print("F " + stats.to_wire(), flush=True)


if __name__ == "__main__":
    main()
