"""A gateway whose credential files are unusable does not start: exit 2,
every problem of every file at once, no secret in what it prints."""
from __future__ import annotations

from gatewayproc import run_cli
from gridgate.security.passwords import format_line, hash_password


def test_bad_credential_files_stop_the_start_with_every_problem(tmp_path):
    good = format_line("meter-1", hash_password(b"pw"))
    (tmp_path / "passwd").write_text(good + "meter-2:$7$101$bad\nno colon\n")
    (tmp_path / "acl").write_text("user meter-1\ntopic sometimes x\n")
    (tmp_path / "keys.json").write_text('{"meter-1": "not a key"}')
    config = tmp_path / "gridgate.toml"
    config.write_text(f'[auth]\npassword_file = "{tmp_path / "passwd"}"\nacl_file = "{tmp_path / "acl"}"\n'
                      f'jwt_keys_file = "{tmp_path / "keys.json"}"\n')
    out = run_cli("serve", "--config", str(config), "--mqtt", "127.0.0.1:0", "--http", "", "--ws", "",
                  "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 2, out.stderr
    for where in ("passwd:2", "passwd:3", "acl:2", "'meter-1', key 1"):
        assert where in out.stderr, out.stderr
    assert good.split(":", 1)[1].strip() not in out.stderr
    assert "Traceback" not in out.stderr
