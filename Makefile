# Two commands set everything up on a fresh machine:
#   make run   - venv + compiled extension + the gateway on its embedded default
#   make test  - venv + compiled extension + import walls, lint, types + the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# One build at a time: the extension is one compilation unit written in place.
LOCK   := flock /tmp/gridgate-build.lock

.PHONY: run test lint build venv bench bench-micro clean asan-build test-asan fuzz

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "Cython>=3.0" "setuptools>=68" wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(LOCK) $(PY) setup.py -q build_ext --inplace

run: build
	ENVIRONMENT=$${ENVIRONMENT:-development} SERVICE_NAME=$${SERVICE_NAME:-gridgate} \
	  $(VENV)/bin/gridgate serve $(ARGS)

# The walls between stages (import-linter contracts in pyproject.toml), the
# linter and the type checker run before the tests: a broken wall fails CI.
lint: build
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench-micro: build
	$(PY) -m bench.micro

# System benchmarks (DESIGN section 9): make bench ARGS="pipelines --duration 10"
bench: build
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench $(or $(ARGS),all)

# -- Memory safety of the compiled hot path (README "Sanitizers and fuzzing") --
# The extension runs with Cython's bounds checks off, so `make test-asan`
# rebuilds it with AddressSanitizer and UBSan into build/asan (the normal
# in-place build is untouched), runs it from a copy of the package there
# (PYTHONPATH), and first proves the sanitizers are live
# (sanitize/check_active.py). Python itself is not instrumented: libasan is
# preloaded, PYTHONMALLOC=malloc gives every Python object its own malloc
# block (redzones around bytes objects instead of pymalloc arenas), and leak
# detection is off (CPython keeps its interned objects until exit).
SAN_CC        ?= gcc
SAN_FLAGS     := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
ASAN_DIR      := build/asan
ASAN_EXAMPLES ?= 2000
ASAN_ENV       = PYTHONPATH=$(ASAN_DIR)/site LD_PRELOAD=$$($(SAN_CC) -print-file-name=libasan.so) \
                 PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 \
                 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
ASAN_TESTS    := tests/protocols/mqtt/test_mqtt_codec.py tests/protocols/mqtt/test_mqtt_hypothesis.py \
                 tests/protocols/mqtt/test_codec5.py tests/protocols/mqtt/test_codec5_differential.py \
                 tests/protocols/mqtt/test_mqtt_take_publishes.py tests/protocols/http/test_http_parser.py \
                 tests/ingest/test_payload.py tests/ingest/test_payload_hypothesis.py tests/test_fuzz_corpus.py \
                 tests/ingest/test_payload_fuzz_regressions.py tests/test_hotpath_truncations.py \
                 tests/protocols/mqtt/test_mqtt5_take_publishes.py tests/storage/test_spool_writer.py \
                 tests/protocols/websocket/test_wsmask.py tests/protocols/websocket/test_frames.py \
                 tests/sinks/test_nats_acks.py tests/sinks/test_nats_frames.py

asan-build: $(STAMP)
	$(LOCK) env CC=$(SAN_CC) CFLAGS="$(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" \
	  $(PY) setup.py -q build_ext --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/tmp
	rm -rf $(ASAN_DIR)/site
	$(PY) -c "import shutil; shutil.copytree('src/gridgate', '$(ASAN_DIR)/site/gridgate', \
	  ignore=shutil.ignore_patterns('__pycache__', '_fastparse*.so'))"
	cp $(ASAN_DIR)/lib/gridgate/_fastparse*.so $(ASAN_DIR)/site/gridgate/
	$(SAN_CC) $(SAN_FLAGS) -fno-sanitize=object-size -O1 -shared -fPIC sanitize/canary.c -o $(ASAN_DIR)/canary.so

# HYPOTHESIS_MAX_EXAMPLES: every property test of these suites reads it.
# --capture=sys: a sanitizer writes its report to file descriptor 2 and ends
# the process, so pytest must not hold fd 2 (its capture file dies unread).
test-asan: asan-build
	$(ASAN_ENV) $(PY) sanitize/check_active.py $(ASAN_DIR)
	$(ASAN_ENV) HYPOTHESIS_MAX_EXAMPLES=$(ASAN_EXAMPLES) $(PY) -m pytest -q --capture=sys -p no:cacheprovider \
	  $(ASAN_TESTS)

# Coverage-guided fuzzing (fuzz/run.py, atheris): each target SECONDS seconds
# on the normal build, steered by the coverage of the pure-Python twin, the
# compiled result checked against the twin's on every input; then every input
# the fuzzer kept is replayed under the sanitizer build (fuzz/replay.py:
# libFuzzer's coverage hooks and gcc's libasan cannot share a process). New
# inputs go to build/fuzz/TARGET/, failures to build/fuzz/artifacts/; the
# committed seeds in fuzz/corpus/TARGET/ are only read.
SECONDS      ?= 60
FUZZ_TARGETS := mqtt mqtt5 http validator proxy wsmask
FUZZ_STAMP   := $(VENV)/.fuzz-installed

# the [fuzz] extra's packages, without reinstalling (and rebuilding) gridgate itself
$(FUZZ_STAMP): $(STAMP)
	$(PY) -m pip install -q $$($(PY) -c "import tomllib; print(' '.join(\
	  tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['fuzz']))")
	touch $@

fuzz: build asan-build $(FUZZ_STAMP)
	mkdir -p build/fuzz/artifacts
	set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/$$t; \
	  if ! $(PY) fuzz/run.py $$t -max_total_time=$(SECONDS) -timeout=20 -max_len=4096 -print_final_stats=1 \
	      -artifact_prefix=build/fuzz/artifacts/$$t- build/fuzz/$$t fuzz/corpus/$$t >build/fuzz/$$t.log 2>&1; then \
	    tail -n 60 build/fuzz/$$t.log; echo "fuzz $$t: FAILED (build/fuzz/$$t.log, build/fuzz/artifacts/)"; exit 1; \
	  fi; \
	  echo "fuzz $$t: $$(grep -E '^(Done|stat::number_of_executed_units)' build/fuzz/$$t.log | tr '\n' ' ')"; \
	  $(ASAN_ENV) $(PY) fuzz/replay.py $$t build/fuzz/$$t fuzz/corpus/$$t; \
	done

clean:
	rm -rf build src/_fastparse.c src/gridgate/_fastparse*.so
