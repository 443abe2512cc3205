"""A real ``haproxy`` for tests, running the checked-in ``deploy/haproxy.cfg``
with its addresses from the environment: the frontends on free loopback
ports, the backends pointing at one gridgate process, or at several (the
file's ``server gw1`` lines repeated as gw2, gw3, ..., in a copy of it).

Readiness: every frontend port accepts a TCP connection (bounded by a
deadline; on failure the error names haproxy's output). ``stop()``: SIGTERM
(haproxy -db exits at once) and wait.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

from natsproc import free_ports

__all__ = ["CONFIG", "HAProxy"]

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
FRONTENDS = ("LB_MQTT", "LB_MQTTS", "LB_HTTP", "LB_WS")


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


class HAProxy:
    """``haproxy -f deploy/haproxy.cfg -db`` in front of one gateway.

    ``gateway``: the gateway's {"mqtt", "http", "ws"} -> (host, port);
    ``tls_pem``: certificate and key of the mqtts frontend in one PEM;
    ``client_ca``: the CAs that sign device certificates.
    ``frontends``: {"mqtt", "mqtts", "http", "ws"} -> (host, port) to connect to.
    """

    def __init__(self, binary: str, work_dir: Path, gateway: dict[str, tuple[str, int]], *, tls_pem: Path,
                 client_ca: Path, start_timeout: float = 20.0,
                 more_gateways: list[dict[str, tuple[str, int]]] = ()) -> None:
        ports = free_ports(len(FRONTENDS))
        self.frontends = {name[3:].lower(): ("127.0.0.1", port) for name, port in zip(FRONTENDS, ports, strict=True)}
        gateways = [gateway, *more_gateways]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LB_", "GW"))}
        env.update({name: _fmt(self.frontends[name[3:].lower()]) for name in FRONTENDS})
        for i, gw in enumerate(gateways, 1):
            env.update({f"GW{i}_MQTT": _fmt(gw["mqtt"]), f"GW{i}_HTTP": _fmt(gw["http"]),
                        f"GW{i}_WS": _fmt(gw["ws"])})
        env.update(LB_TLS_PEM=str(tls_pem), LB_CLIENT_CA=str(client_ca))
        config = CONFIG if len(gateways) == 1 else _with_servers(CONFIG, len(gateways), work_dir)
        checked = subprocess.run([binary, "-c", "-f", str(config)], env=env, capture_output=True, text=True,
                                 timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {config}:\n{checked.stdout}{checked.stderr}")
        self.log_path = work_dir / "haproxy.log"
        self._log = open(self.log_path, "w")      # closed in stop()
        self.proc = subprocess.Popen([binary, "-f", str(config), "-db"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        for addr in self.frontends.values():
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"haproxy did not listen on {_fmt(addr)}:\n{self.log_path.read_text()}")
                try:
                    socket.create_connection(addr, timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


_SERVER_LINE = re.compile(r'^(\s*server )gw1( "\$\{)GW1_(\w+)(\}".*)$')


def _with_servers(config: Path, count: int, work_dir: Path) -> Path:
    """A copy of ``config`` with each ``server gw1 "${GW1_X}" ...`` line
    followed by the same line for gw2 .. gw<count>: what an operator adds
    per gateway."""
    out: list[str] = []
    for line in config.read_text().splitlines():
        out.append(line)
        m = _SERVER_LINE.match(line)
        if m:
            out += [f"{m.group(1)}gw{i}{m.group(2)}GW{i}_{m.group(3)}{m.group(4)}" for i in range(2, count + 1)]
    path = work_dir / f"haproxy-{count}-gateways.cfg"
    path.write_text("\n".join(out) + "\n")
    return path
