"""Start a real ``gridgate serve`` process for tests, on ephemeral loopback ports."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

_LISTENING = re.compile(r"listening (.*)$")
BIN = Path(sys.executable).parent / "gridgate"


def gridgate_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDGATE_") or k == "GRIDGATE_PURE_PYTHON"}
    env.update(ENVIRONMENT="test", SERVICE_NAME="gridgate-test")
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else gridgate_env())


def spool_stats(data_dir: Path) -> dict:
    out = run_cli("spool", "stats", "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def spool_export(data_dir: Path, rejected: bool = False) -> list[dict]:
    args = ["spool", "export", "--data-dir", str(data_dir)] + (["--rejected"] if rejected else [])
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


class GatewayProcess:
    """A ``gridgate serve`` child; ``addresses`` parsed from its listening line."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 start_timeout: float = 30.0) -> None:
        self.data_dir = data_dir
        cmd = [str(BIN), "serve", "--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0", "--ws", "127.0.0.1:0",
               "--data-dir", str(data_dir), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env if env is not None else gridgate_env())
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self.addresses: dict[str, tuple[str, int]] = {}
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                with self._new_line:
                    self.lines.append(line.rstrip("\n"))
                    self._new_line.notify_all()
                m = _LISTENING.search(line)
                if m and not ready.is_set():
                    for part in m.group(1).split():
                        name, _, addr = part.partition("=")
                        host, _, port = addr.rpartition(":")
                        self.addresses[name] = (host.strip("[]"), int(port))
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(start_timeout) or not self.addresses:
            self.kill()
            raise RuntimeError("gridgate did not start:\n" + "\n".join(self.lines))

    @property
    def http(self) -> tuple[str, int]:
        return self.addresses["http"]

    @property
    def mqtt(self) -> tuple[str, int]:
        return self.addresses["mqtt"]

    @property
    def ws(self) -> tuple[str, int]:
        return self.addresses["ws"]

    # the TLS listeners, when the config sets their tls_listen
    @property
    def mqtts(self) -> tuple[str, int]:
        return self.addresses["mqtts"]

    @property
    def https(self) -> tuple[str, int]:
        return self.addresses["https"]

    @property
    def wss(self) -> tuple[str, int]:
        return self.addresses["wss"]

    def metric(self, line_prefix: str) -> float:
        """The value of the first /metrics sample line starting with ``line_prefix`` (0 when absent)."""
        conn = http.client.HTTPConnection(*self.http, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix + " ")]
        return values[0] if values else 0.0

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 20.0) -> None:
        """Return once a log line containing ``text`` is in (woken by each new
        line, no polling); AssertionError with the log after ``timeout``."""
        with self._new_line:
            if not self._new_line.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise AssertionError(f"no log line with {text!r} within {timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the graceful exit, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._pump.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._pump.join(5)
