"""A real ``influxd`` (InfluxDB 1.x, Debian package ``influxdb``) for tests.

Every port on 127.0.0.1 (free ones, found by binding port 0), every directory
under the given base directory, usage reporting and the ``_internal``
monitor database off. ``start()`` returns once ``/ping`` answers 204;
``kill()`` is SIGKILL (a crash), ``restart()`` starts again on the same
directories and ports.

    proc = InfluxProcess(tmp_path)
    proc.start()
    proc.query("SHOW DATABASES")
    proc.stop()
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["InfluxProcess", "InfluxStartError", "influxd_path"]

_CONFIG = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{base}/meta"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{base}/data"
  wal-dir = "{base}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false

[continuous_queries]
  enabled = false

[logging]
  level = "info"
"""

# No proxy, whatever the environment says: the server is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def influxd_path() -> str | None:
    return shutil.which("influxd")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InfluxStartError(RuntimeError):
    """influxd did not come up; the message carries the tail of its log."""


class InfluxProcess:
    def __init__(self, base_dir: str | os.PathLike[str], *, start_timeout_s: float = 20.0) -> None:
        self.base = Path(base_dir).resolve()
        self.start_timeout_s = start_timeout_s
        self.config_path = self.base / "influxdb.conf"
        self.log_path = self.base / "influxd.log"
        self.http_port: int | None = None
        self.rpc_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life cycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.http_port is None:
            raise RuntimeError("influxd was never started")
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start influxd and wait until ``/ping`` answers 204.

        On the first start, free ports are chosen; if another process takes
        one before influxd binds it, new ports are tried (twice more).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("influxd is already running")
        if self.http_port is not None:
            self._spawn_and_wait()
            return
        for attempt in range(3):
            self.http_port, self.rpc_port = _free_port(), _free_port()
            while self.rpc_port == self.http_port:
                self.rpc_port = _free_port()
            self.base.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(_CONFIG.format(base=self.base, http_port=self.http_port,
                                                       rpc_port=self.rpc_port))
            try:
                self._spawn_and_wait()
                return
            except InfluxStartError as exc:
                if attempt == 2 or "address already in use" not in str(exc):
                    raise

    def _spawn_and_wait(self) -> None:
        exe = influxd_path()
        if exe is None:
            raise InfluxStartError("influxd is not installed (apt-get install influxdb)")
        # INFLUXDB_* variables override the config file: keep them out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([exe, "-config", str(self.config_path)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._ping():
                return
            try:
                # Doubles as the pause between polls, and notices an early exit at once.
                code = self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                self.proc = None
                raise InfluxStartError(f"influxd exited with {code} while starting:\n{self.log_tail(since=mark)}")
            if time.monotonic() > deadline:
                self.kill()
                raise InfluxStartError(f"influxd did not answer /ping within {self.start_timeout_s:g} s:\n"
                                       f"{self.log_tail(since=mark)}")

    def _ping(self) -> bool:
        try:
            with _opener.open(f"{self.url}/ping", timeout=0.5) as r:
                return r.status == 204
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL influxd (a crash: no shutdown, no flush) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Kill (if running) and start again on the same directories and port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> InfluxProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    # -- queries ----------------------------------------------------------------

    def query(self, q: str, db: str | None = None, *, epoch: str = "ns", post: bool | None = None) -> dict[str, Any]:
        """Run InfluxQL ``q`` and return the decoded JSON answer.

        Times come back as integers in ``epoch`` units. Statements that change
        something (CREATE, DROP, ...) belong in a POST in InfluxDB 1.x (1.6
        still accepts them in a GET, deprecated); by default SELECT and SHOW
        are GETs and everything else a POST. Raises
        RuntimeError on an HTTP error or an error in the results.
        """
        params = {"q": q, "epoch": epoch}
        if db is not None:
            params["db"] = db
        if post is None:
            post = not q.lstrip().upper().startswith(("SELECT", "SHOW"))
        encoded = urllib.parse.urlencode(params)
        if post:
            req = urllib.request.Request(f"{self.url}/query", data=encoded.encode(), method="POST")
        else:
            req = urllib.request.Request(f"{self.url}/query?{encoded}")
        try:
            with _opener.open(req, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"query {q!r}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        errors = [r["error"] for r in answer.get("results", []) if "error" in r]
        if "error" in answer or errors:
            raise RuntimeError(f"query {q!r}: {answer.get('error') or errors}")
        return answer

    def rows(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        """The rows of a one-statement query as dicts (column -> value), all series together."""
        out = []
        for series in self.query(q, db)["results"][0].get("series", []):
            cols = series["columns"]
            base = series.get("tags", {})
            for values in series["values"]:
                row = dict(base)
                row.update(zip(cols, values, strict=True))
                out.append(row)
        return out
