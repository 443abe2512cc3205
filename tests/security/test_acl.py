"""mosquitto's acl_file semantics, and the default without a file."""
from __future__ import annotations

import pytest

from gridgate.security.acl import ACL, filter_problem, topic_matches


@pytest.mark.parametrize("flt, topic, match", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/", True),
    ("+", "a/b", False), ("a/+/c", "a/x/c", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True), ("a/b", "a/b/", False),
])
def test_topic_matching_follows_mqtt(flt, topic, match):
    assert topic_matches(flt, topic) is match


@pytest.mark.parametrize("flt", ["a/#/b", "a+", "a/b#", ""])
def test_bad_filters_are_named(flt):
    assert filter_problem(flt) is not None


def test_default_rules_without_a_file():
    acl = ACL()
    assert acl.may_write("meter-1", "meter-1", "telemetry")
    assert acl.may_write("meter-1", "meter-1", "devices/meter-1/telemetry")
    assert acl.may_write("meter-1", "meter-1", "devices/meter-1/anything/else")
    assert not acl.may_write("meter-1", "meter-1", "devices/meter-2/telemetry")
    assert acl.may_read("meter-1", "meter-1", "devices/meter-1/commands")
    assert not acl.may_read("meter-1", "meter-1", "devices/meter-2/commands")
    assert not acl.may_read("meter-1", "meter-1", "devices/meter-1/telemetry")
    # anonymous: the client id is its own id
    assert acl.may_write(None, "meter-3", "devices/meter-3/telemetry")
    assert not acl.may_write(None, "meter-3", "devices/meter-1/telemetry")
    assert acl.may_write_device("meter-1", "meter-1") and not acl.may_write_device("meter-1", "meter-2")
    assert acl.may_write_device(None, "meter-9")       # anonymous over HTTP: each reading for its own device


ACL_TEXT = """\
# anonymous section
topic read public/#

user edge-1
topic write devices/meter-1/telemetry
topic write devices/meter-2/#
topic deny devices/meter-2/secret
topic readwrite edge/data
topic devices/meter-5/telemetry

user reader
topic read devices/+/commands

pattern write devices/%c/telemetry
pattern read devices/%u/commands
pattern deny devices/%c/forbidden
"""


def test_an_acl_file_as_mosquitto_judges_it():
    acl, problems = ACL.parse(ACL_TEXT, "acl")
    assert problems == []
    # the user's own section
    assert acl.may_write("edge-1", "edge-1", "devices/meter-1/telemetry")
    assert acl.may_write_device("edge-1", "meter-2") and acl.may_write("edge-1", "x", "devices/meter-2/other")
    assert not acl.may_write("edge-1", "x", "devices/meter-2/secret")        # deny wins in its section
    assert acl.may_write("edge-1", "x", "edge/data") and acl.may_read("edge-1", "x", "edge/data")
    assert acl.may_write_device("edge-1", "meter-5")                          # no access word: readwrite
    assert not acl.may_write_device("edge-1", "meter-3")
    assert not acl.may_read("edge-1", "x", "devices/meter-1/telemetry")       # write only
    # patterns apply to everyone with %c / %u substituted
    assert acl.may_write("reader", "meter-4", "devices/meter-4/telemetry")
    assert not acl.may_write("reader", "meter-4", "devices/meter-5/telemetry")
    assert acl.may_read("reader", "any", "devices/meter-7/commands")          # its own section
    assert acl.may_read("nobody", "c1", "devices/nobody/commands")           # %u
    assert not acl.may_write("nobody", "c1", "devices/c1/forbidden")         # deny pattern
    # anonymous: its section, then patterns without %u
    assert acl.may_read(None, "c1", "public/news") and not acl.may_write(None, "c1", "public/news")
    assert acl.may_write(None, "c1", "devices/c1/telemetry")
    assert not acl.may_read(None, "c1", "devices/c1/commands")               # %u does not apply
    # HTTP: an identity stands for its client id
    assert acl.may_write_device("meter-6", "meter-6") and not acl.may_write_device("meter-6", "meter-7")


@pytest.mark.parametrize("bad", ["a+", "a#", "a/b", "+", "#"])
def test_ids_that_would_widen_a_pattern_are_refused(bad):
    acl, _ = ACL.parse("pattern write devices/%c/#\npattern write users/%u/#\n", "acl")
    assert not acl.may_write(None, bad, f"devices/{bad}/x")
    assert not acl.may_write(bad, "c1", f"users/{bad}/x")
    assert not acl.may_write(bad, "c1", "devices/c1/x")       # a dangerous identity is refused outright
    assert not ACL().may_write(bad, bad, f"devices/{bad}/telemetry")


def test_substitution_is_one_pass():
    acl, _ = ACL.parse("pattern write x/%c/%u\n", "acl")
    assert acl.may_write("bob", "c%u", "x/c%u/bob")
    assert not acl.may_write("bob", "c%u", "x/cbob/bob")


def test_an_empty_file_refuses_everything():
    acl, problems = ACL.parse("# nothing\n", "acl")
    assert problems == [] and not acl.may_write("meter-1", "meter-1", "telemetry")


def test_every_problem_with_its_line():
    acl, problems = ACL.parse("topic write a/#/b\nuser\nfoo bar\ntopic sometimes x/y\ntopic\npattern a+\n"
                              "topic read ok/#\n", "acl")
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4", "5", "6"]
    assert "unknown keyword" in problems[2] and "read, write, readwrite or deny" in problems[3]
    assert acl.may_read(None, "c", "ok/x")           # the good line still parsed


def test_a_file_that_cannot_be_read(tmp_path):
    _, problems = ACL.load(str(tmp_path / "none"))
    assert len(problems) == 1 and "cannot read" in problems[0]


def test_the_verdict_memo_is_bounded(monkeypatch):
    import gridgate.security.acl as acl_mod
    monkeypatch.setattr(acl_mod, "_MEMO_MAX", 10)
    acl = ACL()
    for i in range(50):
        assert acl.may_write_device(f"m{i}", f"m{i}")
    assert len(acl._memo) <= 10
