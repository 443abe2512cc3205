"""Record.fields and Record.tags are read-only once a record is made.

The compiled validator shares one tags dict among every reading of a location
(and one empty dict among readings without tags): a change made through one
record would show in every other and in the validator's location memory. No
test of a sink's output could see such a change made by some later sink, so
the contract is held here over gridgate's source: no statement may change a
dict reached as ``<something>.tags`` / ``<something>.fields``, or a name bound
to one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest

from gridgate import _fastparse
from gridgate.ingest import validator_py
from gridgate.ingest.records import Record
from gridgate.ingest.rules import PayloadRules

SRC = Path(__file__).resolve().parents[2] / "src" / "gridgate"
ATTRS = {"tags", "fields"}
MUTATORS = {"__setitem__", "__delitem__", "__ior__", "update", "pop", "popitem", "setdefault", "clear"}


def _is_record_dict(node: ast.AST, aliases: set[str]) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr in ATTRS)
            or (isinstance(node, ast.Name) and node.id in aliases))


def _mutations(tree: ast.AST) -> list[int]:
    """Lines that change a record's fields/tags dict, per function: names bound
    straight from ``x.tags`` / ``x.fields`` count as that dict."""
    found: list[int] = []
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]
    for scope in scopes:
        aliases = {t.id for n in ast.walk(scope) if isinstance(n, ast.Assign)
                   and isinstance(n.value, ast.Attribute) and n.value.attr in ATTRS
                   for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(scope):
            targets: list[ast.AST] = []
            if isinstance(n, (ast.Assign, ast.Delete)):
                targets = list(n.targets)
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
                targets = [n.target]
                if isinstance(n, ast.AugAssign) and _is_record_dict(n.target, aliases):
                    found.append(n.lineno)
            for t in targets:
                if isinstance(t, ast.Subscript) and _is_record_dict(t.value, aliases):
                    found.append(n.lineno)
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in MUTATORS
                    and _is_record_dict(n.func.value, aliases)):
                found.append(n.lineno)
    return sorted(set(found))


def test_the_check_sees_a_change() -> None:
    code = ("def f(r):\n    r.tags['a'] = 'b'\n    t = r.fields\n    t.update(x=1)\n"
            "    del r.tags['a']\n    r.tags |= {}\n    u = {**r.tags, 'a': 'b'}\n    u['c'] = 'd'\n")
    assert _mutations(ast.parse(code)) == [2, 4, 5, 6]


def test_no_module_changes_a_records_fields_or_tags() -> None:
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        lines = _mutations(ast.parse(path.read_text(), str(path)))
        if lines:
            bad[str(path.relative_to(SRC))] = lines
    assert bad == {}


@pytest.mark.parametrize("extra", [{}, {"tags": {}}])
def test_readings_of_one_location_share_their_tags(extra: dict) -> None:
    rules = PayloadRules()
    v = _fastparse.Validator(rules)
    reading = {"temperature": 21.5, "location": "eu/plant-1", **extra}
    records: list[Record] = []
    for _ in range(3):
        v.validate_into(msgspec.json.encode(reading), "json", "mqtt", "dev-1", 1, records, [])
    assert [r.tags for r in records] == [{"region": "eu", "site": "plant-1"}] * 3
    assert records[0].tags is records[1].tags is records[2].tags
    # as the twin makes them
    twin, _ = validator_py.Validator(rules).validate(msgspec.json.encode(reading), "json", "mqtt", "dev-1", 1)
    assert twin[0].tags == records[0].tags


def test_a_readings_own_tags_leave_the_shared_ones_alone() -> None:
    v = _fastparse.Validator(PayloadRules())
    records: list[Record] = []
    for reading in ({"temperature": 1.0, "location": "eu/plant-1"},
                    {"temperature": 1.0, "location": "eu/plant-1", "tags": {"vendor": "acme"}},
                    {"temperature": 1.0, "location": "eu/plant-1"},
                    {"temperature": 1.0},
                    {"temperature": 1.0, "tags": {"vendor": "acme"}},
                    {"temperature": 1.0}):
        v.validate_into(msgspec.json.encode(reading), "json", "mqtt", "dev-1", 1, records, [])
    assert [r.tags for r in records] == [
        {"region": "eu", "site": "plant-1"}, {"region": "eu", "site": "plant-1", "vendor": "acme"},
        {"region": "eu", "site": "plant-1"}, {}, {"vendor": "acme"}, {}]
    assert records[0].tags is records[2].tags and records[3].tags is records[5].tags
