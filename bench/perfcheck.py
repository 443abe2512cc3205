"""The perf gate of CI (DESIGN section 9): a short pipelines bench under
py-spy, and three checks that fail the build.

    python -m bench.perfcheck run   --out DIR [--duration S] [--rounds N] [--floor X]
    python -m bench.perfcheck check DIR [--floor X]    (a results.json from `python -m bench ... --profile`)

Fails (exit 1, one "PERF GATE FAILED: ..." line per reason) when

1. the compiled hot path is not the one loaded: `gridgate --version` and the
   fast server's own start-up line must both say "hot path: compiled (FILE)"
   with FILE an importable extension module (not the pure-Python twin);
2. fast/std falls under the floor (default 2.0) on GATE_DRIVER: the median
   over the rounds of the per-round ratio, each round running std then fast
   back to back on fresh servers;
3. the fast server's start-up line does not say "spool writer: compiled":
   commits would go through Python's sqlite3 on a worker thread, which waits
   for the GIL at every step under load;
4. the fast engine's py-spy profile has samples with frames from the
   standard library's json package or from h11 (the std engine's parser):
   neither belongs in the fast engine's hot path. As a self-test of this
   check, the std engine's profile must show h11 frames.

Why the per-round median of GATE_DRIVER: measured on the 2-core development
machine shared with other work (README, Performance), single 3 s rounds of
fast/std swing by more than 2x either way on every driver, so one round
cannot gate; the median of 5 back-to-back pairs moved much less (README
gives the spread).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import pipelines, procs, report

FLOOR = 2.0
FORBIDDEN = {"stdlib json": re.compile(r"(^|/)json/[^/]+\.py$"), "h11": re.compile(r"(^|/)h11/[^/]+\.py$")}
_COMPILED = re.compile(r"hot path: compiled \((.+)\)")


def check_compiled(server_line: str | None) -> list[str]:
    problems = []
    out = subprocess.run([str(procs.BIN / "gridgate"), "--version"], capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).strip()
    for where, line in (("`gridgate --version`", text), ("the fast server's start-up log", server_line or "")):
        m = _COMPILED.search(line)
        if not m:
            problems.append(f"{where} does not report the compiled hot path: {line!r}")
            continue
        path = m.group(1)
        if not any(path.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            problems.append(f"{where} names {path}, which is not a compiled extension module")
        elif not Path(path).is_file():
            problems.append(f"{where} names {path}, which does not exist")
    return problems


def check_spool_writer(server_line: str | None) -> list[str]:
    if server_line and server_line.startswith("spool writer: compiled"):
        return []
    return [f"the fast server's start-up log does not report the compiled spool writer: {server_line!r}"]


def forbidden_frames(speedscope: Path) -> dict[str, dict]:
    """Per forbidden module: samples that have one of its frames, out of all,
    and the heaviest such stack (leaf first, short)."""
    doc = json.loads(speedscope.read_text())
    frames = doc["shared"]["frames"]
    hits = {name: {"samples": 0, "stacks": {}} for name in FORBIDDEN}
    total = 0
    for profile in doc["profiles"]:
        for sample in profile["samples"]:  # one per sample (weights are seconds)
            weight = 1
            total += weight
            for name, pattern in FORBIDDEN.items():
                matched = [i for i in sample if pattern.search(frames[i].get("file") or "")]
                if matched:
                    hits[name]["samples"] += weight
                    first = sample.index(matched[0])
                    key = " <- ".join(f"{frames[i]['name']} ({Path(frames[i].get('file') or '?').name})"
                                      for i in reversed(sample[max(0, first - 3):first + 1]))
                    hits[name]["stacks"][key] = hits[name]["stacks"].get(key, 0) + weight
    for name in hits:
        stacks = hits[name].pop("stacks")
        hits[name]["total_samples"] = total
        hits[name]["top_stack"] = max(stacks, key=stacks.get) if stacks else None
    return hits


def check(results: dict, floor: float) -> tuple[list[str], dict]:
    """The gate's failures (empty = pass) and what it measured."""
    pipe = results["scenarios"]["pipelines"] if "scenarios" in results else results
    failures: list[str] = []
    gate = pipe.get("gate_driver", pipelines.GATE_DRIVER)
    per = pipe["summary"].get(gate)
    measured: dict = {"driver": gate, "floor": floor}
    failures += check_compiled(pipe.get("hot_path", {}).get("fast"))
    failures += check_spool_writer(pipe.get("spool_writer", {}).get("fast"))
    if not per or "fast_vs_std_by_round" not in per:
        failures.append(f"no fast/std measurement on {gate} in the results")
    else:
        ratios = per["fast_vs_std_by_round"]
        ratio = statistics.median(ratios)
        measured.update(ratio=ratio, by_round=ratios, median_ratio_of_medians=per["fast_vs_std"],
                        cpu_ratio=per.get("fast_vs_std_cpu"))
        if ratio < floor:
            failures.append(f"fast/std readings/s on {gate} is {ratio:.2f}x (median of {len(ratios)} rounds: "
                            f"{', '.join(f'{r:.2f}' for r in ratios)}), under the {floor:.1f}x floor")
    profiled = {r["contender"]: r.get("profile") for r in pipe["runs"] if r.get("profiled")}
    if not profiled.get("fast"):
        failures.append("no py-spy profile of the fast engine (run with --profile)")
    else:
        hits = forbidden_frames(Path(profiled["fast"]["speedscope_json"]))
        measured["fast_profile"] = hits
        for name, h in hits.items():
            if h["samples"]:
                failures.append(f"the fast engine's profile has {name} frames in {h['samples']} of "
                                f"{h['total_samples']} samples, e.g. {h['top_stack']}")
    if profiled.get("std"):
        std_hits = forbidden_frames(Path(profiled["std"]["speedscope_json"]))
        measured["std_profile"] = std_hits
        if not std_hits["h11"]["samples"]:
            failures.append("self-test: the std engine's profile shows no h11 frames, so the frame check "
                            "cannot be trusted (did py-spy sample the server?)")
    return failures, measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perfcheck", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the short gate bench under py-spy, then check it")
    r.add_argument("--out", type=Path, default=Path("perf-artifacts"))
    r.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    r.add_argument("--rounds", type=int, default=7, help="std/fast pairs (default 7)")
    r.add_argument("--floor", type=float, default=FLOOR)
    c = sub.add_parser("check", help="check the results.json of an earlier `python -m bench ... --profile`")
    c.add_argument("dir", type=Path)
    c.add_argument("--floor", type=float, default=FLOOR)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.cmd == "run":
        if args.duration <= 0 or args.rounds < 1:
            parser.error("--duration must be > 0 and --rounds >= 1")
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        print(f"perf gate: pipelines {pipelines.GATE_DRIVER}, std vs fast, {args.rounds} rounds of "
              f"{args.duration:g} s, then one py-spy run each", flush=True)
        pipe = pipelines.run(args.duration, args.rounds, out, True, log=lambda line: print(line, flush=True),
                             drivers=[pipelines.GATE_DRIVER], contenders=("std", "fast"))
        results = {"machine": report.machine(),
                   "command": "python -m bench.perfcheck " + " ".join(sys.argv[1:] if argv is None else argv),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": {"pipelines": pipe}}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        report.write(results, out)
    else:
        out = args.dir
        results = json.loads((out / "results.json").read_text())
    failures, measured = check(results, args.floor)
    measured.update(passed=not failures, failures=failures, seconds=round(time.monotonic() - started, 1))
    (out / "perf-gate.json").write_text(json.dumps(measured, indent=2))
    if "ratio" in measured:
        cpu = measured.get("cpu_ratio")
        print(f"perf gate: fast/std {measured['ratio']:.2f}x on {measured['driver']} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in measured['by_round'])}; floor {args.floor:.1f}x)"
              + (f"; per server CPU-second {cpu:.2f}x" if cpu else ""))
    for f in failures:
        print(f"PERF GATE FAILED: {f}", file=sys.stderr)
    if not failures:
        print(f"perf gate: passed (artifacts in {out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
