"""mosquitto_passwd's file format, both ways, with the real mosquitto tools."""
from __future__ import annotations

import base64
import hashlib
import os
import pwd
import socket
import subprocess
import time

import pytest

from binaries import require
from gridgate.security.passwords import (
    MAX_PASSWORD_BYTES,
    PasswordFile,
    PasswordHash,
    format_line,
    hash_password,
    parse_hash,
    replace_line,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_file_made_by_mosquitto_passwd_verifies(tmp_path):
    tool = require("mosquitto_passwd")
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "meter-1", "s3cret pass"], check=True)
    subprocess.run([tool, "-b", str(path), "meter-2", "other"], check=True)
    pw, problems = PasswordFile.load(str(path))
    assert problems == [] and len(pw) == 2
    entry = pw.get("meter-1")
    assert entry is not None and entry.kind == 7 and entry.iterations == 101
    assert entry.verify(b"s3cret pass")
    assert not entry.verify(b"s3cret pas") and not entry.verify(b"")
    assert pw.get("meter-2").verify(b"other") and not pw.get("meter-2").verify(b"s3cret pass")
    assert pw.get("meter-3") is None


def test_a_sha512_line_as_mosquitto_reads_it():
    # $6$: SHA-512 of the password, then the salt (src/security_default.c, pw__digest)
    salt = bytes(range(12))
    digest = hashlib.sha512(b"pw" + salt).digest()
    field = f"$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    entry = parse_hash(field)
    assert isinstance(entry, PasswordHash) and entry.kind == 6
    assert entry.verify(b"pw") and not entry.verify(b"pw2")
    assert entry.encode() == field


@pytest.fixture
def mosquitto_broker(tmp_path):
    """A real mosquitto broker that requires the password file tmp_path/passwd."""
    broker = require("mosquitto")
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    # user: run as us (as root, mosquitto would switch to user mosquitto, which cannot read tmp_path)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
                    f"user {pwd.getpwuid(os.getuid()).pw_name}\n")
    return broker, conf, port


def test_lines_we_write_are_accepted_by_a_real_mosquitto(tmp_path, mosquitto_broker):
    pub = require("mosquitto_pub")
    broker, conf, port = mosquitto_broker
    salt = b"0123456789ab"
    sha6 = PasswordHash(6, 1, salt, hashlib.sha512(b"six" + salt).digest())
    (tmp_path / "passwd").write_text(format_line("meter-7", hash_password(b"seven pw"))
                                     + format_line("meter-6", sha6)
                                     + format_line("meter-8", hash_password(b"eight", iterations=5000)))
    proc = subprocess.Popen([broker, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mosquitto exited: {proc.stderr.read()}")
                assert time.monotonic() < deadline, "mosquitto did not start"
                time.sleep(0.05)

        def pub_as(user: str, password: str) -> int:
            return subprocess.run([pub, "-h", "127.0.0.1", "-p", str(port), "-i", user, "-u", user, "-P", password,
                                   "-t", "t", "-m", "x", "-q", "1"], capture_output=True, timeout=30).returncode

        assert pub_as("meter-7", "seven pw") == 0
        assert pub_as("meter-6", "six") == 0
        assert pub_as("meter-8", "eight") == 0
        # and the broker does check them: a wrong password is refused
        assert pub_as("meter-7", "seven") != 0
        assert pub_as("meter-6", "seven pw") != 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_bad_line_is_reported_with_its_number_and_no_secret():
    good = format_line("meter-1", hash_password(b"x")).strip()
    salt64 = base64.b64encode(b"s" * 12).decode()
    text = "\n".join([
        "# comment",
        "",
        good,                                             # 3: fine
        "no colon here",                                  # 4
        ":$7$101$abc$def",                                # 5 empty id
        "meter-2:$5$abc$def",                             # 6 unknown hash type
        f"meter-3:$7$0${salt64}$AAAA",                    # 7 iterations
        "meter-4:$7$101$!!notbase64$AAAA",                # 8 salt
        f"meter-5:$7$101${salt64}$AAAA",                  # 9 hash length
        good,                                             # 10 duplicate of line 3
        f"meter-6:$6$101${salt64}$AAAA",                  # 11 too many fields for $6$
    ])
    pw, problems = PasswordFile.parse(text, "pw")
    assert [p.split(":")[1] for p in problems] == ["4", "5", "6", "7", "8", "9", "10", "11"]
    assert "iterations" in problems[3] and "salt" in problems[4] and "64 bytes" in problems[5]
    assert "first on line 3" in problems[6]
    assert all(good.split(":", 1)[1] not in p for p in problems)
    assert list(pw.entries) == ["meter-1"]


def test_an_unreadable_file_is_one_problem(tmp_path):
    pw, problems = PasswordFile.load(str(tmp_path / "missing"))
    assert len(pw) == 0 and len(problems) == 1 and "cannot read" in problems[0]


def test_a_64_kib_password_is_refused_before_hashing():
    # an entry that would cost ~0.7 s of PBKDF2 per check
    entry = hash_password(b"right", iterations=1_000_000)
    started = time.perf_counter()
    assert not entry.verify(b"x" * 65_535)
    assert not entry.verify(b"x" * (MAX_PASSWORD_BYTES + 1))
    assert time.perf_counter() - started < 0.05
    with pytest.raises(ValueError):
        hash_password(b"x" * (MAX_PASSWORD_BYTES + 1))


def test_replace_line_keeps_others_and_comments():
    text = "# devices\nmeter-1:$7$old\nmeter-2:$7$two\nmeter-1:$7$dup\n"
    out = replace_line(text, "meter-1", "meter-1:$7$new\n")
    assert out == "# devices\nmeter-1:$7$new\nmeter-2:$7$two\n"
    assert replace_line(out, "meter-3", "meter-3:$7$x\n").endswith("meter-2:$7$two\nmeter-3:$7$x\n")
    assert replace_line("meter-2:$7$two", "meter-3", "meter-3:$7$x\n") == "meter-2:$7$two\nmeter-3:$7$x\n"
    with pytest.raises(ValueError):
        format_line("a:b", hash_password(b"x"))
