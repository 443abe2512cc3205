"""docs/mqtt-conformance.md stays true: every MQTT 3.1.1 statement of the
spec's Appendix B has one row, and every test a row names exists.

A row's last column is either "does not apply to an ingest gateway: why", or
names tests as ``path::function``; a named test must be a function of that
file (``def`` or ``async def`` at the start of a line), so a renamed or
deleted test fails here instead of leaving the document pointing at nothing.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mqtt-conformance.md"

# Appendix B of MQTT 3.1.1: how many statements each section numbers, 1..n.
APPENDIX_B = {
    "1.5.3": 3, "2.2.2": 2, "2.3.1": 7, "3.1.0": 2, "3.1.2": 24, "3.1.3": 11, "3.1.4": 5, "3.2.0": 1, "3.2.2": 6,
    "3.3.1": 12, "3.3.2": 3, "3.3.4": 1, "3.3.5": 2, "3.6.1": 1, "3.8.1": 1, "3.8.3": 4, "3.8.4": 6, "3.9.3": 2,
    "3.10.1": 1, "3.10.3": 2, "3.10.4": 6, "3.12.4": 1, "3.14.1": 1, "3.14.4": 3, "4.1.0": 2, "4.3.1": 1, "4.3.2": 2,
    "4.3.3": 2, "4.4.0": 1, "4.5.0": 2, "4.6.0": 6, "4.7.1": 3, "4.7.2": 1, "4.7.3": 4, "4.8.0": 2, "6.0.0": 4,
    "7.0.0": 2, "7.1.1": 1, "7.1.2": 1,
}
# The spec prints this one id as "MQTT-3-8.3-4"; the document keeps its spelling.
SPEC_SPELLING = {"MQTT-3.8.3-4": "MQTT-3-8.3-4"}
NOT_APPLICABLE = "does not apply to an ingest gateway: "
ROW = re.compile(r"^\| (MQTT-[0-9.-]+) \| (.+?) \| (.+) \|$")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def rows(text: str | None = None) -> list[tuple[str, str, str]]:
    text = DOC.read_text() if text is None else text
    found = [m.groups() for line in text.splitlines() if (m := ROW.match(line))]
    assert found, "no statement rows"
    return found


def expected_ids() -> list[str]:
    ids = [f"MQTT-{section}-{n}" for section, count in APPENDIX_B.items() for n in range(1, count + 1)]
    return [SPEC_SPELLING.get(i, i) for i in ids]


def missing_tests(text: str | None = None) -> list[str]:
    """"statement: path::name" for every named test that is not a function of its file."""
    defined: dict[str, set[str]] = {}
    missing = []
    for statement, _, checked in rows(text):
        for path, name in TEST_REF.findall(checked):
            if path not in defined:
                source = ROOT / path
                defined[path] = (set(re.findall(r"^(?:async )?def (test_\w+)\(", source.read_text(), re.M))
                                 if source.is_file() else set())
            if name not in defined[path]:
                missing.append(f"{statement}: {path}::{name}")
    return missing


def test_every_statement_of_appendix_b_has_exactly_one_row():
    ids = [statement for statement, _, _ in rows()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert sorted(ids) == sorted(expected_ids())


def test_every_row_names_a_test_or_says_why_not():
    for statement, says, checked in rows():
        assert says.strip(), statement
        if not checked.startswith(NOT_APPLICABLE):
            assert TEST_REF.search(checked), f"{statement}: neither a test nor '{NOT_APPLICABLE}...'"
        else:
            assert len(checked) > len(NOT_APPLICABLE) + 10, f"{statement}: say why it does not apply"


def test_every_named_test_exists():
    assert missing_tests() == []


def test_a_renamed_test_or_file_is_reported():
    text = ("| MQTT-9.9.9-1 | x | tests/protocols/mqtt/test_mqtt_codec.py::test_violation, "
            "tests/protocols/mqtt/test_mqtt_codec.py::test_violation_renamed |\n"
            "| MQTT-9.9.9-2 | y | tests/no_such_file.py::test_violation |\n"
            "| MQTT-9.9.9-3 | z | tests/protocols/mqtt/test_mqtt_codec.py::MQTT_ERROR_REASONS |\n")
    assert missing_tests(text) == ["MQTT-9.9.9-1: tests/protocols/mqtt/test_mqtt_codec.py::test_violation_renamed",
                                   "MQTT-9.9.9-2: tests/no_such_file.py::test_violation",
                                   "MQTT-9.9.9-3: tests/protocols/mqtt/test_mqtt_codec.py::MQTT_ERROR_REASONS"]
