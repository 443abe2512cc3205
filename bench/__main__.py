"""System benchmarks of DESIGN section 9.

    python -m bench {pipelines,mqtt,conns,sinks,storm,tls,workers,ws,all} [--duration S] [--rounds N] [--out DIR]
                    [--[no-]profile] [--workers 1,2]

Every server is started here on free loopback ports and driven in the same
run, in alternating rounds; results.json, report.md and PNG plots go to
--out. Compare the ratios, not the absolute numbers: the load generators
share this machine's cores with the servers.

It needs the optional dependencies (pip install -e '.[bench]'): matplotlib
for the plots, uvicorn and httptools for the pipelines reference, py-spy for
--profile; a missing one is named before anything starts (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import procs, report

SCENARIOS = ("pipelines", "mqtt", "conns", "sinks", "storm", "tls", "workers", "ws")
EXIT_MISSING = 2          # an optional dependency is not installed: nothing was run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per contender (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy record each gridgate server in one extra run per scenario (flame graph SVG + "
                             "speedscope JSON in OUT/profiles; not counted in the medians). On by default for 'all', "
                             "whose targets table names the profile's next bottleneck for each short target")
    parser.add_argument("--workers", type=_workers_list, default=None, metavar="N,M",
                        help="the gridgate --workers counts of the workers scenario (default 1,2); "
                             "'mqtt --workers 1,2' runs that scenario")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration must be > 0 and --rounds >= 1")
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if args.profile is None:
        args.profile = args.scenario == "all"
    if args.workers is not None and args.scenario == "mqtt":
        scenarios = ["workers"]         # the spelling: gridgate with N workers against mosquitto
    missing = procs.missing_bench_dependencies(scenarios, args.profile)
    if missing:
        print(f"python -m bench: missing {', '.join(missing)} (optional [bench] dependencies"
              f"{'; py-spy for --profile' if 'py-spy' in missing else ''}); nothing was run. "
              f"Install them with: {procs.INSTALL_HINT}", file=sys.stderr)
        return EXIT_MISSING
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": report.machine(), "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": {}}
    failed: dict[str, str] = {}
    for name in scenarios:
        module = __import__(f"bench.{name}", fromlist=["run"])
        print(f"{name}:", flush=True)
        extra = {"workers": args.workers} if name == "workers" and args.workers is not None else {}
        try:
            results["scenarios"][name] = module.run(args.duration, args.rounds, args.out, args.profile,
                                                    log=lambda line: print(line, flush=True), **extra)
        except Exception as exc:  # one scenario failing must not lose the others' results
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name} FAILED: {failed[name]}", file=sys.stderr, flush=True)
        finally:
            procs.discard_all()              # the scenario's servers' data, counted by now
        results["failed"] = failed
        # after every scenario, so a later failure or ^C keeps what was measured
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    md = report.write(results, args.out)
    print()
    print(md)
    if failed:
        print(f"python -m bench: failed scenario(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _workers_list(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes counts like 1,2, not {text!r}") from None
    if not counts or any(n < 1 or n > 64 for n in counts) or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"--workers takes increasing counts from 1 to 64, like 1,2: {text!r}")
    return counts


if __name__ == "__main__":
    sys.exit(main())
