"""Proves `make test-asan` really runs sanitized, before its tests run.

Run with the environment of the sanitized test run (LD_PRELOAD of the
sanitizer runtime, PYTHONPATH of the sanitized package copy):

    python sanitize/check_active.py ASAN_DIR

Fails (exit 1) unless all of these hold:

1. ``gridgate._fastparse`` is imported from ASAN_DIR, not the normal build;
2. that extension calls AddressSanitizer's and UBSan's checks (its undefined
   dynamic symbols include ``__asan_report_load*`` and ``__ubsan_handle_*``):
   it was compiled with the flags, not just linked;
3. an out-of-bounds heap read in ASAN_DIR/canary.so (sanitize/canary.c, built
   with the extension's flags but UBSan's object-size check, which would
   report it first), run in a child process, dies with
   AddressSanitizer's heap-buffer-overflow report;
4. a signed overflow in that canary dies with UBSan's report
   (UBSAN_OPTIONS=halt_on_error=1).

A target that silently ran unsanitized (a wrong LD_PRELOAD, the normal .so
first on the path, flags dropped by a build change) fails at one of these.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path


def canary(asan_dir: Path, which: str) -> None:
    """In the child: trigger the named canary (the process should die in it)."""
    lib = ctypes.CDLL(str(asan_dir / "canary.so"))
    if which == "heap-read":
        lib.gridgate_canary_heap_read(8)
    elif which == "signed-overflow":
        lib.gridgate_canary_add_one(2**31 - 1)
    else:
        raise SystemExit(f"unknown canary {which}")
    # Still alive: the sanitizer did not catch it.
    print(f"canary {which} ran to completion", file=sys.stderr)
    raise SystemExit(0)


def expect_report(asan_dir: Path, which: str, report: str) -> str | None:
    child = subprocess.run([sys.executable, __file__, str(asan_dir), "--canary", which],
                           capture_output=True, text=True, timeout=120)
    if child.returncode == 0 or report not in child.stderr:
        return (f"canary {which}: expected a sanitizer report {report!r} and a failing exit, got exit "
                f"{child.returncode} and stderr:\n{child.stderr[-2000:]}")
    return None


def main(argv: list[str]) -> int:
    asan_dir = Path(argv[1]).resolve()
    if len(argv) == 4 and argv[2] == "--canary":
        canary(asan_dir, argv[3])
    failures: list[str] = []

    from gridgate import _fastparse
    so = Path(_fastparse.__file__ or "").resolve()
    if asan_dir not in so.parents:
        failures.append(f"gridgate._fastparse comes from {so}, not from {asan_dir}")
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
    for prefix in ("__asan_report_load", "__ubsan_handle_"):
        if prefix not in nm.stdout:
            failures.append(f"{so} has no {prefix}* calls: not compiled with the sanitizer flags")
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        failures.append("LD_PRELOAD does not name libasan")

    for which, report in (("heap-read", "ERROR: AddressSanitizer: heap-buffer-overflow"),
                          ("signed-overflow", "runtime error: signed integer overflow")):
        failure = expect_report(asan_dir, which, report)
        if failure:
            failures.append(failure)

    for failure in failures:
        print(f"check_active: {failure}", file=sys.stderr)
    if not failures:
        print(f"check_active: sanitizers active ({so.name} instrumented, ASan and UBSan canaries caught)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
