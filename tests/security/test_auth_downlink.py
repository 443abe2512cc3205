"""mosquitto_sub with a mosquitto_passwd file: a device receives the command
an operator posts with an admin token, and cannot subscribe to another
device's commands (real gridgate serve, mosquitto_sub, curl)."""
from __future__ import annotations

import json
import subprocess
import time

from binaries import require
from gatewayproc import GatewayProcess, run_cli


def test_mosquitto_sub_receives_a_command_posted_with_an_admin_token(tmp_path):
    mosquitto_passwd, mosquitto_sub, curl = require("mosquitto_passwd"), require("mosquitto_sub"), require("curl")
    passwd = tmp_path / "passwd"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(passwd), "meter-1", "one pw"], check=True)
    made = run_cli("admin-token", "ops", "--scope", "commands:write")
    assert made.returncode == 0, made.stderr
    admin = made.stdout.strip()
    (tmp_path / "admin.toml").write_text(made.stderr.split("\n", 1)[1])
    config = tmp_path / "gridgate.toml"
    config.write_text(f'[auth]\npassword_file = "{passwd}"\nfailure_delay_ms = 100\n'
                      f'[admin]\ntokens_file = "{tmp_path / "admin.toml"}"\n')
    gw = GatewayProcess(tmp_path / "data", "--config", str(config))
    host, port = gw.mqtt
    sub = subprocess.Popen([mosquitto_sub, "-h", host, "-p", str(port), "-i", "meter-1", "-u", "meter-1",
                            "-P", "one pw", "-q", "1", "-t", "devices/meter-1/commands", "-C", "1", "-W", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = "http://{}:{}/v1/devices/meter-1/commands".format(*gw.http)
        deadline = time.monotonic() + 20
        while True:                # until the subscription is in place (the device is online)
            out = subprocess.run([curl, "-s", "-H", f"Authorization: Bearer {admin}", "-H",
                                  "Content-Type: application/json", "--data", '{"type": "REBOOT"}', url],
                                 capture_output=True, text=True, timeout=30)
            if json.loads(out.stdout).get("delivered"):
                break
            assert time.monotonic() < deadline, out.stdout
            time.sleep(0.2)
        stdout, stderr = sub.communicate(timeout=30)
        assert sub.returncode == 0, stderr
        assert json.loads(stdout)["type"] == "REBOOT"
        # another device's commands: the SUBACK refuses (0x80), mosquitto_sub says so
        other = subprocess.run([mosquitto_sub, "-h", host, "-p", str(port), "-i", "meter-1", "-u", "meter-1",
                                "-P", "one pw", "-t", "devices/meter-2/commands", "-C", "1", "-W", "3"],
                               capture_output=True, text=True, timeout=30)
        # (mosquitto_sub 2.0 exits 0 on a refused subscription, after saying so)
        assert "all subscription requests were denied" in other.stderr.lower() and other.stdout == "", other
        wrong = subprocess.run([mosquitto_sub, "-h", host, "-p", str(port), "-i", "meter-1", "-u", "meter-1",
                                "-P", "nope", "-t", "devices/meter-1/commands", "-C", "1", "-W", "3"],
                               capture_output=True, text=True, timeout=30)
        assert wrong.returncode != 0 and "bad user name or password" in wrong.stderr.lower()
    finally:
        if sub.poll() is None:
            sub.kill()
        assert gw.stop() == 0, gw.log()
