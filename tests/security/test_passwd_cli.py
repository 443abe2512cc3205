"""``gridgate passwd`` as a user runs it (a real child process)."""
from __future__ import annotations

import os
import stat
import subprocess

from binaries import require
from gatewayproc import BIN, gridgate_env, run_cli
from gridgate.security.passwords import PasswordFile


def _check(path, identity: str, password: bytes) -> bool:
    pw, problems = PasswordFile.load(str(path))
    assert problems == []
    entry = pw.get(identity)
    return entry is not None and entry.verify(password)


def test_passwd_adds_then_replaces_keeping_other_lines(tmp_path):
    path = tmp_path / "passwd"
    tool = require("mosquitto_passwd")
    subprocess.run([tool, "-c", "-b", str(path), "meter-1", "theirs"], check=True)
    path.write_text("# fleet A\n" + path.read_text())
    out = run_cli("passwd", str(path), "meter-2", "-b", "two pw")
    assert out.returncode == 0, out.stderr
    assert _check(path, "meter-2", b"two pw") and _check(path, "meter-1", b"theirs")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = run_cli("passwd", str(path), "meter-1", "-b", "new one", "--iterations", "2000")
    assert out.returncode == 0, out.stderr
    assert _check(path, "meter-1", b"new one") and not _check(path, "meter-1", b"theirs")
    lines = path.read_text().splitlines()
    assert lines[0] == "# fleet A" and len(lines) == 3 and "$7$2000$" in lines[1]
    assert "new one" not in path.read_text() and "new one" not in out.stdout + out.stderr
    # and mosquitto_passwd takes a file we wrote (one without comments: it refuses those, its broker does not)
    ours = tmp_path / "ours"
    assert run_cli("passwd", str(ours), "meter-1", "-b", "one").returncode == 0
    subprocess.run([tool, "-b", str(ours), "meter-3", "three"], check=True)
    assert _check(ours, "meter-3", b"three") and _check(ours, "meter-1", b"one")


def _prompted(path, *answers: str) -> subprocess.CompletedProcess:
    # no controlling terminal (a new session): getpass reads the answers from stdin
    return subprocess.run([str(BIN), "passwd", str(path), "meter-5"], input="".join(a + "\n" for a in answers),
                          capture_output=True, text=True, timeout=60, env=gridgate_env(), start_new_session=True)


def test_passwd_prompts_twice(tmp_path):
    path = tmp_path / "passwd"
    out = _prompted(path, "typed", "typed")
    assert out.returncode == 0, out.stderr
    assert _check(path, "meter-5", b"typed")
    out = _prompted(path, "one", "other")
    assert out.returncode == 1 and "do not match" in out.stderr
    assert _check(path, "meter-5", b"typed")


def test_passwd_refusals_leave_the_file_alone(tmp_path):
    path = tmp_path / "passwd"
    assert run_cli("passwd", str(path), "meter-1", "-b", "ok").returncode == 0
    before = path.read_text()
    for args, said in [(["bad:id", "-b", "x"], "id"), (["meter-2", "-b", ""], "empty"),
                       (["meter-2", "-b", "x" * 2000], "at most"), (["meter-2", "-b", "x", "--iterations", "0"],
                                                                    "iterations")]:
        out = run_cli("passwd", str(path), *args)
        assert out.returncode == 1 and said in out.stderr, out.stderr
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]       # no temporary file left behind
