"""The fuzz targets' committed corpus, replayed in the normal suite.

Every file of fuzz/corpus/TARGET/ (the seeds of fuzz/make_corpus.py and each
input the fuzzer found a crash or a disagreement with) goes through the
target's check (fuzz/targets.py): the compiled hot path and its pure-Python
twin must agree on it. ``make test-asan`` runs this file too, so the corpus
is also replayed under AddressSanitizer and UBSan.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def load_targets() -> dict[str, Callable[[bytes], None]]:
    spec = importlib.util.spec_from_file_location("fuzz_targets", FUZZ / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TARGETS


TARGETS = load_targets()
CORPUS = sorted((target, path) for target in TARGETS for path in (FUZZ / "corpus" / target).iterdir())


def test_every_target_has_a_seed_corpus():
    assert {target for target, _ in CORPUS} == set(TARGETS) == {"mqtt", "mqtt5", "http", "validator", "proxy", "wsmask"}


@pytest.mark.parametrize("target, path", CORPUS, ids=[f"{t}-{p.name[:12]}" for t, p in CORPUS])
def test_compiled_and_twin_agree_on_the_corpus(target, path):
    TARGETS[target](path.read_bytes())
