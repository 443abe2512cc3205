"""The admin API behind tokens: made with `gridgate admin-token`, read from
[admin] tokens_file, checked by curl against a real gateway."""
from __future__ import annotations

import json
import subprocess

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, run_cli


def make_token(tmp_path, name: str, *scopes: str) -> str:
    out = run_cli("admin-token", name, *[a for s in scopes for a in ("--scope", s)])
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token not in out.stderr                                # the file gets the digest only
    with open(tmp_path / "admin.toml", "a") as f:
        f.write(out.stderr.split("\n", 1)[1])
    return token


def curl(curl_bin: str, url: str, *args: str) -> tuple[int, dict[str, str], dict]:
    out = subprocess.run([curl_bin, "-s", "-i", *args, url], capture_output=True, text=True, timeout=30)
    head, _, body = out.stdout.partition("\n\n")
    lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    is_json = headers.get("content-type", "").startswith("application/json")
    return int(lines[0].split()[1]), headers, json.loads(body) if is_json else {}


def test_admin_routes_need_a_token_with_the_scope(tmp_path):
    curl_bin = require("curl")
    reader = make_token(tmp_path, "dashboards", "devices:read")
    operator = make_token(tmp_path, "oncall", "commands:write", "bans:write")
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_ADMIN_TOKENS_FILE=str(tmp_path / "admin.toml")))
    try:
        base = "http://{}:{}".format(*gw.http)
        status, headers, body = curl(curl_bin, f"{base}/v1/connections")
        assert status == 401 and body["error"] == "unauthorized"
        assert headers["www-authenticate"] == 'Bearer realm="gridgate-admin"'
        assert curl(curl_bin, f"{base}/v1/connections", "-H", "Authorization: Bearer ggadm_wrong")[0] == 401
        assert curl(curl_bin, f"{base}/v1/connections", "-H", f"Authorization: Bearer {reader}")[0] == 200
        assert curl(curl_bin, f"{base}/v1/bans", "-H", f"Authorization: Bearer {operator}")[0] == 200
        status, _, body = curl(curl_bin, f"{base}/v1/devices/meter-1/commands", "-H",
                               f"Authorization: Bearer {reader}", "-H", "Content-Type: application/json",
                               "--data", '{"type": "REBOOT"}')
        assert status == 403 and body == {"error": "forbidden",
                                          "detail": "admin token 'dashboards' lacks the scope commands:write"}
        status, _, body = curl(curl_bin, f"{base}/v1/devices/meter-1/commands", "-H",
                               f"Authorization: Bearer {operator}", "-H", "Content-Type: application/json",
                               "--data", '{"type": "REBOOT"}')
        assert status == 404 and body["error"] == "device_offline"     # past the gate: the device is not here
        # open routes stay open
        assert curl(curl_bin, f"{base}/healthz")[0] == 200
        assert curl(curl_bin, f"{base}/metrics")[0] == 200
    finally:
        assert gw.stop() == 0, gw.log()
    assert reader not in gw.log() and operator not in gw.log()


def test_metrics_token_required(tmp_path):
    curl_bin = require("curl")
    token = make_token(tmp_path, "prometheus", "devices:read")
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_ADMIN_TOKENS_FILE=str(tmp_path / "admin.toml"),
                                                            GRIDGATE_ADMIN_METRICS_TOKEN_REQUIRED="true"))
    try:
        base = "http://{}:{}".format(*gw.http)
        assert curl(curl_bin, f"{base}/metrics")[0] == 401
        out = subprocess.run([curl_bin, "-s", "-H", f"Authorization: Bearer {token}", f"{base}/metrics"],
                             capture_output=True, text=True, timeout=30)
        assert "gridgate_connections" in out.stdout
    finally:
        assert gw.stop() == 0, gw.log()


def test_admin_token_refuses_unknown_scopes():
    out = run_cli("admin-token", "x", "--scope", "root")
    assert out.returncode == 2 and "unknown scope(s) root" in out.stderr and out.stdout == ""


def test_a_bad_tokens_file_stops_the_start_with_every_problem(tmp_path):
    path = tmp_path / "admin.toml"
    path.write_text('[[token]]\nname = "a"\nsha256 = "nothex"\nscopes = ["devices:read"]\n'
                    '[[token]]\nname = "b"\nsha256 = "' + "0" * 64 + '"\nscopes = []\n')
    out = run_cli("serve", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ws", "",
                  "--data-dir", str(tmp_path / "data"), env=gridgate_env(GRIDGATE_ADMIN_TOKENS_FILE=str(path)))
    assert out.returncode == 2, out.stderr
    assert "token 'a': sha256 must be 64 lower-case hex digits" in out.stderr
    assert "token 'b': scopes must be a non-empty list" in out.stderr


def test_sighup_reloads_the_admin_tokens(tmp_path):
    import signal

    curl_bin = require("curl")
    first = make_token(tmp_path, "first", "devices:read")
    gw = GatewayProcess(tmp_path / "data", env=gridgate_env(GRIDGATE_ADMIN_TOKENS_FILE=str(tmp_path / "admin.toml")))
    try:
        url = "http://{}:{}/v1/connections".format(*gw.http)
        assert curl(curl_bin, url, "-H", f"Authorization: Bearer {first}")[0] == 200
        (tmp_path / "admin.toml").write_text("")
        second = make_token(tmp_path, "second", "devices:read")      # the file now holds only this one
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for_line("SIGHUP: reloaded")
        assert curl(curl_bin, url, "-H", f"Authorization: Bearer {first}")[0] == 401
        assert curl(curl_bin, url, "-H", f"Authorization: Bearer {second}")[0] == 200
    finally:
        assert gw.stop() == 0, gw.log()
