"""Runs every input of some corpus folders through a fuzz target's check, without atheris.

    python fuzz/replay.py TARGET DIR [DIR ...]

``make fuzz`` runs it under the AddressSanitizer/UBSan build after each fuzz
run: libFuzzer's coverage hooks clash with gcc's sanitizer runtime (its
libasan defines the same symbols and Python coverage goes blind), so the
fuzzer runs the normal build and every input it kept (each one reached code
no earlier input did) is replayed here under the sanitizers. Exits 1 with the
input's path on the first disagreement; a sanitizer report aborts the process.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: {argv[0]} {{{','.join(targets.TARGETS)}}} DIR [DIR ...]")
    check = targets.TARGETS[argv[1]]
    count = 0
    for folder in argv[2:]:
        for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
            try:
                check(path.read_bytes())
            except Exception:
                print(f"replay {argv[1]}: {path} fails", file=sys.stderr)
                raise
            count += 1
    print(f"replay {argv[1]}: {count} inputs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
