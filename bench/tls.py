"""tls: gridgate's mqtts listener vs mosquitto's TLS listener (issue 19),
both with the same ECDSA P-256 server certificate made here for the run.

- handshakes: ``bench.tls_driver`` in HANDSHAKE_PROCS processes of
  HANDSHAKE_THREADS blocking clients loops new TCP connection, full TLS
  handshake, CONNECT, CONNACK, DISCONNECT, close for --duration; handshakes/s
  and the server's CPU per handshake (user + sys from /proc/PID/stat over
  the run, all its threads);
- idle: IDLE_CONNECTIONS idle TLS connections (``gridgate-loadgen mqtt
  --idle --tls``) to a fresh server, RSS before and after (bench.conns'
  method: the server counts all of them and its RSS has settled);
- QoS 1: ``gridgate-loadgen mqtt --qos 1`` with DEVICES devices at 10 and
  at 1 in flight, over TLS and plain, each server fresh per run.

mosquitto gets ``set_tcp_nodelay true`` (over TLS its handshake's last
flight waits ~44 ms on Nagle otherwise), for its plain runs too so TLS vs
plain changes one thing. gridgate's sockets have TCP_NODELAY already (trio).
Runs alternate contenders within each round, as in the other scenarios.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import conns, procs, report

CONTENDERS = ("gridgate", "mosquitto")
HANDSHAKE_PROCS = 2
HANDSHAKE_THREADS = 6
IDLE_CONNECTIONS = 5_000
IDLE_CONNECT_RATE = 1_000      # a TLS handshake costs ~1 ms of server CPU: 2,000/s would saturate a core
DEVICES = 100
INFLIGHTS = (10, 1)
LOADGEN_PROCS = 2
TARGET_QOS1_VS_MOSQUITTO = 1.0
TARGET_HANDSHAKE_CPU_VS_MOSQUITTO = 1.3
TARGET_IDLE_KIB = 20.0

Log = Callable[[str], None]


# -- certificates ----------------------------------------------------------------

def make_pki(directory: Path) -> dict[str, str]:
    """A CA and an ECDSA P-256 server certificate for 127.0.0.1, as PEM
    files: {"ca", "cert", "key"}. World-readable, key included (a throwaway
    for this run): mosquitto started as root reads them after it has
    switched to its own user."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gridgate bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.crt", "cert": directory / "server.crt", "key": directory / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    for path in files.values():
        os.chmod(path, 0o644)
    return {k: str(v) for k, v in files.items()}


# -- servers -----------------------------------------------------------------------

def start(name: str, tls: bool, pki: dict[str, str]) -> procs.Server:
    if name == "gridgate":
        env = {"GRIDGATE_MQTT_TLS_LISTEN": "127.0.0.1:0", "GRIDGATE_TLS_CERT_FILE": pki["cert"],
               "GRIDGATE_TLS_KEY_FILE": pki["key"]} if tls else {}
        return procs.gridgate(mqtt=True, extra_env=env)
    return mosquitto(pki if tls else None)


def address(server: procs.Server, tls: bool) -> tuple[str, int]:
    if server.name == "mosquitto":
        assert server.address is not None
        return server.address
    return server.addresses["mqtts" if tls else "mqtt"]


def mosquitto(pki: dict[str, str] | None) -> procs.Server:
    """mosquitto as in bench.mqtt (no persistence: it acks QoS 1 on receipt),
    with TCP_NODELAY, and with `pki`: its listener is TLS only."""
    exe = procs.mosquitto_path()
    assert exe is not None, "mosquitto is not installed (gridgate_and_mosquitto skips it)"
    port = procs.free_port()
    conf = Path(tempfile.mkdtemp(prefix="mosquitto-tls-bench-")) / "mosquitto.conf"
    tls = f"certfile {pki['cert']}\nkeyfile {pki['key']}\n" if pki else ""
    conf.write_text(f"set_tcp_nodelay true\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                    f"max_connections -1\nlog_type error\nlistener {port} 127.0.0.1\n{tls}")
    return procs.Server("mosquitto", [exe, "-c", str(conf)], address=("127.0.0.1", port))


# -- the three measurements ----------------------------------------------------------

def handshakes(name: str, pki: dict[str, str], duration: float, threads: int = HANDSHAKE_THREADS,
               n_procs: int = HANDSHAKE_PROCS, profile_dir: Path | None = None) -> dict[str, Any]:
    server = start(name, True, pki)
    try:
        host, port = address(server, True)
        time.sleep(0.3)     # past the readiness probe and start-up
        if profile_dir is not None:
            server.profile(profile_dir, f"tls-handshakes-{name}", duration)
        cpu0 = server.cpu_seconds()
        drivers = [subprocess.Popen([sys.executable, "-m", "bench.tls_driver", "--target", f"{host}:{port}",
                                     "--cafile", pki["ca"], "--duration", str(duration), "--threads", str(threads)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "PYTHONPATH": str(procs.ROOT)})
                   for _ in range(n_procs)]
        outs = []
        for d in drivers:
            out, err = d.communicate(timeout=duration * 2 + 60)
            if d.returncode != 0:
                raise RuntimeError(f"tls_driver failed: {err[-2000:]}")
            outs.append(json.loads(out))
        server_cpu = server.cpu_seconds() - cpu0
        profile_files = server.finish_profile()
    finally:
        server.stop()
    done = sum(o["handshakes"] for o in outs)
    elapsed = max(o["elapsed_s"] for o in outs)
    run_: dict[str, Any] = {
        "contender": name, "handshakes": done, "errors": sum(o["errors"] for o in outs),
        "first_error": next((o["first_error"] for o in outs if o["first_error"]), ""), "elapsed_s": elapsed,
        "handshakes_per_s": done / elapsed if elapsed else 0.0, "server_cpu_s": server_cpu,
        "server_cpu_us_per_handshake": server_cpu / done * 1e6 if done else None,
        "driver_cpu_us_per_handshake": sum(o["cpu_s"] for o in outs) / done * 1e6 if done else None}
    if profile_files:
        run_["profile"] = profile_files
    return run_


def idle(name: str, pki: dict[str, str], n: int) -> dict[str, Any]:
    """bench.conns._one over TLS: RSS of a fresh server before and after `n`
    idle TLS connections."""
    server = start(name, True, pki)
    loadgen: subprocess.Popen | None = None
    connect_deadline = n / IDLE_CONNECT_RATE * 3 + 30
    err = tempfile.NamedTemporaryFile(prefix="tls-idle-loadgen-", suffix=".log", delete=False)
    try:
        time.sleep(0.5)
        rss0 = conns._settled_rss(server)
        count = conns._counter(name, server)
        if count() != 0:
            raise RuntimeError(f"{name} holds {count()} connections before the load generator started")
        host, port = address(server, True)
        cmd = [str(procs.BIN / "gridgate-loadgen"), "mqtt", "--target", f"{host}:{port:d}", "--idle", "--tls",
               "--cafile", pki["ca"], "--devices", str(n), "--procs", str(LOADGEN_PROCS),
               "--connect-rate", str(IDLE_CONNECT_RATE),
               "--duration", str(math.ceil(connect_deadline + conns.SETTLE_MAX_S + 30)),
               "--client-prefix", f"tls-idle-{name}"]
        if n > 10_000:      # one loopback source address has ~28k ephemeral ports
            cmd += ["--source-ips", conns.SOURCE_IPS]
        t0 = time.monotonic()
        loadgen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        while (connected := count()) < n:
            if loadgen.poll() is not None:
                raise RuntimeError(f"{name}: gridgate-loadgen exited ({loadgen.returncode}) with {connected} of {n} "
                                   f"connected: {conns._tail(err.name)}")
            if time.monotonic() - t0 > connect_deadline:
                raise RuntimeError(f"{name}: only {connected} of {n} idle TLS connections after "
                                   f"{connect_deadline:.0f} s: {conns._tail(err.name)}")
            time.sleep(0.25)
        connect_s = time.monotonic() - t0
        rss = conns._settled_rss(server)
        still = count()
    finally:
        if loadgen is not None and loadgen.poll() is None:
            os.killpg(loadgen.pid, signal.SIGTERM)      # its own session: the loadgen and its workers
            try:
                loadgen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(loadgen.pid, signal.SIGKILL)
                loadgen.wait()
        server.stop()
        os.unlink(err.name)
    return {"contender": name, "connections": n, "rss0_kb": rss0, "rss_kb": rss, "per_conn_kib": (rss - rss0) / n,
            "connect_s": connect_s, "server_count_after_settle": still}


def qos1(name: str, tls: bool, inflight: int, pki: dict[str, str], duration: float, devices: int = DEVICES,
         profile_dir: Path | None = None) -> dict[str, Any]:
    server = start(name, tls, pki)
    try:
        if profile_dir is not None:
            server.profile(profile_dir, f"tls-qos1-inflight{inflight}-{name}", duration)
        cpu0 = server.cpu_seconds()
        opts: dict[str, Any] = {"devices": devices, "inflight": inflight, "qos": 1, "procs": LOADGEN_PROCS,
                                "client_prefix": f"tls-{name}"}
        if tls:
            opts.update(tls=True, cafile=pki["ca"])
        result = procs.loadgen("mqtt", address(server, tls), duration, **opts)
        server_cpu = server.cpu_seconds() - cpu0
        profile_files = server.finish_profile()
    finally:
        server.stop()
    acked = result["acked"]
    run_: dict[str, Any] = {
        "contender": name, "transport": "tls" if tls else "plain", "inflight": inflight,
        "readings_per_s": result["readings_per_s"], "sent": result["sent"], "acked": acked,
        "errors": result["errors"], "p99_ms": result["latency_ms"]["p99"],
        "server_cpu_us_per_reading": server_cpu / acked * 1e6 if acked else None,
        "loadgen_cpu_us_per_reading": result["loadgen_cpu_us_per_reading"]}
    if profile_files:
        run_["profile"] = profile_files
    return run_


# -- the scenario -----------------------------------------------------------------------

def run(duration: float, rounds: int, out: Path, profile: bool, log: Log = print,
        idle_connections: int = IDLE_CONNECTIONS, devices: int = DEVICES) -> dict:
    contenders, skipped = procs.gridgate_and_mosquitto(log)
    # not under OUT: its parents may be closed to mosquitto's user (pytest's tmp_path is 0700)
    pki = make_pki(Path(tempfile.mkdtemp(prefix="gridgate-tls-bench-")))
    results: dict[str, Any] = {
        "scenario": "tls", "duration_s": duration, "rounds": rounds, "skipped": skipped,
        "versions": {"mosquitto": procs.mosquitto_version()} if "mosquitto" in contenders else {},
        "handshake_clients": f"{HANDSHAKE_PROCS} processes x {HANDSHAKE_THREADS} threads",
        "idle_connections": idle_connections, "devices": devices, "loadgen_procs": LOADGEN_PROCS,
        "handshakes": [], "idle": [], "qos1": [], "profiles": []}
    for rnd in range(rounds):
        for name in contenders:
            h = handshakes(name, pki, duration)
            results["handshakes"].append({**h, "round": rnd})
            log(f"  round {rnd + 1}/{rounds} handshakes {name:9s} {h['handshakes_per_s']:8,.0f}/s  server CPU "
                f"{_us(h['server_cpu_us_per_handshake'])} us/handshake  errors {h['errors']}")
        for name in contenders:
            try:
                i = idle(name, pki, idle_connections)
            except RuntimeError as exc:     # one failing must not lose the rest of the run
                results["idle"].append({"contender": name, "round": rnd, "error": str(exc)})
                log(f"  round {rnd + 1}/{rounds} idle TLS {name:9s} FAILED: {exc}")
                continue
            results["idle"].append({**i, "round": rnd})
            log(f"  round {rnd + 1}/{rounds} idle TLS {name:9s} {idle_connections:,}: RSS "
                f"{i['rss0_kb'] / 1024:.1f} -> {i['rss_kb'] / 1024:.1f} MiB, {i['per_conn_kib']:.1f} KiB/connection")
        for inflight in INFLIGHTS:
            for tls in (True, False):
                for name in contenders:
                    q = qos1(name, tls, inflight, pki, duration, devices)
                    results["qos1"].append({**q, "round": rnd})
                    log(f"  round {rnd + 1}/{rounds} QoS 1 x{inflight:<2d} {q['transport']:5s} {name:9s} "
                        f"{q['readings_per_s']:9,.0f} readings/s  server CPU "
                        f"{_us(q['server_cpu_us_per_reading'])} us/reading  errors {q['errors']}")
    if profile and "gridgate" in contenders:
        # extra runs, not counted: py-spy's samplers share the 2 cores
        pdir = out / "profiles"
        results["profiles"].append({"what": "handshakes", **handshakes("gridgate", pki, duration, profile_dir=pdir)})
        for inflight in INFLIGHTS:
            results["profiles"].append({"what": f"QoS 1 over TLS x{inflight} in flight",
                                        **qos1("gridgate", True, inflight, pki, duration, devices,
                                               profile_dir=pdir)})
        log(f"  profiled gridgate: {', '.join(p['what'] for p in results['profiles'])}")
    results["summary"] = summarize(results)
    return results


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(res: dict) -> dict:
    s: dict[str, Any] = {"handshakes": {}, "idle": {}, "qos1": {}}
    for name in CONTENDERS:
        mine = [r for r in res["handshakes"] if r["contender"] == name]
        if mine:
            s["handshakes"][name] = {
                "per_s": _median([r["handshakes_per_s"] for r in mine]),
                "server_cpu_us": _median([r["server_cpu_us_per_handshake"] for r in mine
                                          if r["server_cpu_us_per_handshake"] is not None]),
                "errors": sum(r["errors"] for r in mine)}
        idle_runs = [r for r in res["idle"] if r["contender"] == name and "error" not in r]
        if idle_runs:
            s["idle"][name] = {"per_conn_kib": _median([r["per_conn_kib"] for r in idle_runs]),
                               "rss0_mib": _median([r["rss0_kb"] / 1024 for r in idle_runs]),
                               "rss_mib": _median([r["rss_kb"] / 1024 for r in idle_runs])}
        for inflight in INFLIGHTS:
            for transport in ("tls", "plain"):
                runs = [r for r in res["qos1"] if (r["contender"], r["inflight"], r["transport"])
                        == (name, inflight, transport)]
                if runs:
                    s["qos1"][f"{name} x{inflight} {transport}"] = {
                        "readings_per_s": _median([r["readings_per_s"] for r in runs]),
                        "server_cpu_us": _median([r["server_cpu_us_per_reading"] for r in runs
                                                  if r["server_cpu_us_per_reading"] is not None]),
                        "errors": sum(r["errors"] for r in runs)}
    hs, q = s["handshakes"], s["qos1"]
    s["handshake_cpu_vs_mosquitto"] = _ratio(hs.get("gridgate", {}).get("server_cpu_us"),
                                             hs.get("mosquitto", {}).get("server_cpu_us"))
    s["handshakes_per_s_vs_mosquitto"] = _ratio(hs.get("gridgate", {}).get("per_s"),
                                                hs.get("mosquitto", {}).get("per_s"))
    for inflight in INFLIGHTS:
        g, m = q.get(f"gridgate x{inflight} tls"), q.get(f"mosquitto x{inflight} tls")
        s[f"qos1_tls_x{inflight}_vs_mosquitto"] = _ratio(g and g["readings_per_s"], m and m["readings_per_s"])
        for name in CONTENDERS:
            t, p = q.get(f"{name} x{inflight} tls"), q.get(f"{name} x{inflight} plain")
            s[f"{name}_x{inflight}_tls_vs_plain"] = _ratio(t and t["readings_per_s"], p and p["readings_per_s"])
    gi = s["idle"].get("gridgate")
    s["targets"] = {
        "qos1_tls_x10": _meets(s["qos1_tls_x10_vs_mosquitto"], lambda x: x >= TARGET_QOS1_VS_MOSQUITTO),
        "handshake_cpu": _meets(s["handshake_cpu_vs_mosquitto"], lambda x: x <= TARGET_HANDSHAKE_CPU_VS_MOSQUITTO),
        "idle_kib": _meets(gi and gi["per_conn_kib"], lambda x: x <= TARGET_IDLE_KIB)}
    return s


def _meets(x: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if x is None else ok(x)


def _yes(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**NO**")


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(res: dict) -> list[str]:
    """The markdown section of report.md."""
    s = res["summary"]
    hs, idle_, q = s["handshakes"], s["idle"], s["qos1"]
    names = [n for n in CONTENDERS if n in hs or n in idle_]
    lines = [f"## tls: mqtts, gridgate vs mosquitto {res['versions'].get('mosquitto') or ''} (same ECDSA P-256 "
             "certificate, TLS 1.3)", "",
             f"{_rounds(res['rounds'])}, {res['duration_s']:g} s per timed run; handshake clients: "
             f"{res['handshake_clients']} (bench.tls_driver); QoS 1: gridgate-loadgen, {res['devices']} devices, "
             f"{res['loadgen_procs']} processes. mosquitto has set_tcp_nodelay true in all its runs.", "",
             "| | " + " | ".join(names) + " | gridgate / mosquitto | target |",
             "|---|" + "---:|" * len(names) + "---:|---|"]

    def row(label: str, values: list[str], ratio: str, target: str) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + f" | {ratio} | {target} |")

    row("TLS handshakes/s (connect, handshake, CONNECT, CONNACK, close)",
        [_num(hs.get(n, {}).get("per_s")) for n in names], _x(s["handshakes_per_s_vs_mosquitto"]), "")
    row("server CPU per handshake (µs)", [_num(hs.get(n, {}).get("server_cpu_us")) for n in names],
        _x(s["handshake_cpu_vs_mosquitto"]),
        f"≤ {TARGET_HANDSHAKE_CPU_VS_MOSQUITTO}x: {_yes(s['targets']['handshake_cpu'])}")
    row(f"RSS at 0 → {res['idle_connections']:,} idle TLS connections (MiB)",
        [f"{idle_[n]['rss0_mib']:.1f} → {idle_[n]['rss_mib']:.1f}" if n in idle_ else "-" for n in names], "", "")
    gk, mk = idle_.get("gridgate", {}).get("per_conn_kib"), idle_.get("mosquitto", {}).get("per_conn_kib")
    row("KiB per idle TLS connection", [f"{idle_[n]['per_conn_kib']:.1f}" if n in idle_ else "-" for n in names],
        _x(_ratio(gk, mk)), f"≤ {TARGET_IDLE_KIB:g} KiB: {_yes(s['targets']['idle_kib'])}")
    for inflight in INFLIGHTS:
        for transport in ("tls", "plain"):
            target = ""
            if transport == "tls" and inflight == 10:
                target = f"≥ {TARGET_QOS1_VS_MOSQUITTO:g}x: {_yes(s['targets']['qos1_tls_x10'])}"
            ratio = s[f"qos1_tls_x{inflight}_vs_mosquitto"] if transport == "tls" else _ratio(
                (q.get(f"gridgate x{inflight} plain") or {}).get("readings_per_s"),
                (q.get(f"mosquitto x{inflight} plain") or {}).get("readings_per_s"))
            row(f"QoS 1 readings/s, {res['devices']} x {inflight} in flight, {transport}",
                [_num((q.get(f"{n} x{inflight} {transport}") or {}).get("readings_per_s")) for n in names],
                _x(ratio), target)
        row(f"TLS / plain, x {inflight} in flight", [_x(s.get(f"{n}_x{inflight}_tls_vs_plain")) for n in names],
            "", "")
        row(f"server CPU per reading over TLS, x {inflight} (µs)",
            [_num((q.get(f"{n} x{inflight} tls") or {}).get("server_cpu_us")) for n in names], "", "")
    errors = sum(v.get("errors", 0) for v in [*hs.values(), *q.values()])
    lines += ["", f"Client-side errors over all runs: {errors}."]
    failed = [r for r in res["idle"] if "error" in r]
    if failed:
        lines += [f"- idle run failed: {r['contender']}: {r['error'][:300]}" for r in failed]
    for p in res.get("profiles", []):
        if "profile" in p:
            total, top = report.profile_top(Path(p["profile"]["speedscope_json"]))
            lines += ["", f"py-spy, gridgate, {p['what']} ({total:,} samples; extra run, not in the table):", "",
                      "| function (own time) | own | total |", "|---|---:|---:|",
                      *[f"| `{name}` | {a:.1%} | {b:.1%} |" for name, a, b in top]]
    return lines + [""]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _rounds(n: int) -> str:
    return f"median of {n} rounds" if n > 1 else "1 round"
