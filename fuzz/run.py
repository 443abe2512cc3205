"""Coverage-guided fuzzing of the compiled hot path against its pure-Python twins (atheris).

    python fuzz/run.py TARGET [libFuzzer options] [corpus dirs]

TARGET is one of fuzz/targets.py's ``TARGETS`` (mqtt, mqtt5, http, validator, proxy, wsmask); the
rest goes to libFuzzer as it is (``make fuzz`` passes -max_total_time, a
scratch corpus in build/fuzz/ that new inputs go to, then the committed seeds
in fuzz/corpus/TARGET/, which libFuzzer only reads).

Coverage: the pure-Python twins are instrumented (atheris.instrument_imports),
so an input that takes a new branch of the reference codec is kept. The
compiled module has no coverage instrumentation (gcc cannot emit libFuzzer's),
but its code follows its twin's branch for branch, so the twin's coverage
steers the search through both. The fuzzer runs the normal build (libFuzzer's
hooks and gcc's libasan cannot share a process); ``make fuzz`` then replays
every input it kept under the AddressSanitizer/UBSan build of ``make
test-asan`` (fuzz/replay.py), where an overread aborts with the sanitizer's
report.

A disagreement raises fuzz.targets.Disagreement, a crash of either side its
own exception: libFuzzer writes the input to build/fuzz/artifacts/ and
stops. Such an input belongs in fuzz/corpus/TARGET/ (tests/test_fuzz_corpus.py
replays every file there in the normal suite) and in a regression test.
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["gridgate.protocols.mqtt.codec_py", "gridgate.protocols.mqtt.codec5_py",
                                         "gridgate.protocols.mqtt.v5", "gridgate.protocols.http.parser_py",
                                         "gridgate.ingest.validator_py", "gridgate.protocols.proxy_protocol",
                                         "gridgate.protocols.wsmask_py", "targets"]):
    import targets


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        raise SystemExit(f"usage: {argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer options] [corpus dirs]")
    check = targets.TARGETS[argv[1]]

    def one_input(data: bytes) -> None:
        check(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
