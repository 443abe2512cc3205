"""The ``gridgate`` command line (DESIGN section 2)."""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from gridgate import __version__

if TYPE_CHECKING:
    from gridgate.config import Config

EXIT_CONFIG = 2
E = TypeVar("E", bound=BaseException)

# The cyclic GC's first threshold for ``gridgate serve`` (CPython's default is
# 700). Nearly everything a reading allocates is freed by reference counting,
# but the objects of the ~1,000 readings in flight push the young generation
# past 700 once per commit cycle: under MQTT QoS 1 load that was ~900
# collections in 10 s, ~4% of the event loop's CPU; at 10,000 it was 2. An
# embedding program keeps its own settings: gridgate.serve() does not touch them.
GC_THRESHOLD0 = 10_000


def _version_text() -> str:
    from gridgate import hotpath

    return f"gridgate {__version__}\n{hotpath.describe()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridgate",
        description="Ingest front end for energy-fleet telemetry (MQTT, HTTP, WebSocket).",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the version and whether the compiled hot path is in use")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: the embedded default)")
    serve.add_argument("--mqtt", metavar="HOST:PORT", help='MQTT listener ("" disables it; port 0 = ephemeral)')
    serve.add_argument("--http", metavar="HOST:PORT", help='HTTP listener ("" disables it; port 0 = ephemeral)')
    serve.add_argument("--ws", metavar="HOST:PORT",
                       help='WebSocket listener: /v1/ws and MQTT on /mqtt ("" disables it; port 0 = ephemeral)')
    serve.add_argument("--http-engine", choices=["fast", "std"],
                       help="HTTP engine: fast (compiled parser, the default) or std (h11)")
    serve.add_argument("--data-dir", metavar="DIR", help="spool directory (default ./gridgate-data)")
    serve.add_argument("--idle-timeout", metavar="SECONDS", type=float,
                       help="drop connections silent this long (default 300)")
    serve.add_argument("--sink", choices=["spool", "influxdb", "nats"],
                       help="where readings go (default spool; influxdb/nats keep the spool as store-and-forward)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", metavar="N|auto", type=_workers_arg,
                       help="N gateway processes on the same ports (SO_REUSEPORT) under a supervisor; "
                            "auto = one per CPU (default [service] workers, 1: no supervisor)")
    # set by the supervisor of --workers N for its workers (gridgate.cluster.supervisor)
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--listen", action="append", default=[], metavar="NAME=HOST:PORT", help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", metavar="FILE")

    spool = sub.add_parser("spool", help="inspect the spool")
    spool_sub = spool.add_subparsers(dest="spool_command", metavar="SUBCOMMAND", required=True)
    stats = spool_sub.add_parser("stats", help="counts as one JSON object")
    stats.add_argument("--data-dir", metavar="DIR", default=None)
    export = spool_sub.add_parser("export", help="records (or rejections) as JSON Lines")
    export.add_argument("--data-dir", metavar="DIR", default=None)
    export.add_argument("--rejected", action="store_true", help="export the dead-letter store")
    export.add_argument("--limit", type=int, metavar="N", default=None)

    passwd = sub.add_parser("passwd",
                            help="add or replace a device's line in a password file (mosquitto_passwd's format)")
    passwd.add_argument("file", metavar="FILE", help="the password file (made if missing, mode 0600)")
    passwd.add_argument("id", metavar="ID", help="the device id (or other identity)")
    passwd.add_argument("-b", dest="password", metavar="PASSWORD",
                        help="the password on the command line (visible to other users: prefer the prompt)")
    passwd.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="PBKDF2 iterations (default 101, mosquitto_passwd's)")

    admin_token = sub.add_parser("admin-token",
                                 help="make an admin API token: prints it once, and the [[token]] entry to add")
    admin_token.add_argument("name", metavar="NAME", help="who or what holds it (shown in logs and 403s)")
    admin_token.add_argument("--scope", dest="scopes", action="append", required=True, metavar="S",
                             help="devices:read, commands:write or bans:write (repeat for several)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides = {
        "mqtt": {"listen": args.mqtt},
        "http": {"listen": args.http, "engine": args.http_engine},
        "websocket": {"listen": args.ws},
        "spool": {"data_dir": args.data_dir},
        "connections": {"idle_timeout_s": args.idle_timeout},
        "sink": {"kind": args.sink},
        "service": {"log_level": args.log_level, "workers": args.workers},
    }
    if getattr(args, "listen", None):     # a worker: the ports its supervisor reserved win over everything
        from gridgate.cluster.supervisor import LISTENERS

        for item in args.listen:
            name, _, address = item.partition("=")
            section, key = LISTENERS[name]
            overrides[section][key] = address
    return overrides


def _load_config(path: str | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config | None:
    from gridgate.config import Config, ConfigError

    try:
        return Config.load(path, overrides=overrides)
    except ConfigError as exc:
        print(f"gridgate: {exc}", file=sys.stderr)
        return None


def _setup_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=fmt,
        stream=sys.stderr,
    )


def tune_gc() -> None:
    """For a serving process: what is loaded so far lives as long as the
    process, so it leaves the collector's view (gc.freeze); young objects are
    collected every GC_THRESHOLD0 net allocations."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


def _cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from gridgate.config import ConfigError
    from gridgate.gateway import ListenError

    config = _load_config(args.config, _overrides(args))
    if config is None:
        return EXIT_CONFIG
    workers = config.service.workers
    if workers == "auto":
        import os

        workers = os.cpu_count() or 1
    on_ready: Callable[[], None] | None = None
    if args.worker_index is not None:
        from gridgate.cluster import worker

        if args.worker_of is not None:
            worker.die_with_parent(args.worker_of)
        _setup_logging(config.service.log_level, worker.log_format(args.worker_index))
        if args.ready_fd is not None:
            on_ready = partial(worker.notify_ready, args.ready_fd)
    elif workers > 1:
        from gridgate.cluster import supervisor

        _setup_logging(config.service.log_level,
                       "%(asctime)s %(levelname)s %(name)s supervisor[%(process)d]: %(message)s")
        logging.getLogger("gridgate").info("gridgate %s starting %d workers: environment=%s service=%s",
                                           __version__, workers, config.service.environment,
                                           config.service.service_name)
        return supervisor.supervise(config, args.argv, workers)
    else:
        _setup_logging(config.service.log_level)
    log = logging.getLogger("gridgate")
    log.info("gridgate %s starting: environment=%s service=%s", __version__, config.service.environment,
             config.service.service_name)

    tune_gc()
    failed: list[OSError] = []
    unusable: list[ConfigError] = []
    try:
        trio.run(partial(_serve_until_stopped, config, log,
                         partial(_reload_config, args.config, _overrides(args), log),
                         reuse_port=args.worker_index is not None, on_ready=on_ready))
    except* ConfigError as group:  # the password file, JWT keys, ACL, admin tokens (read at start): every problem
        unusable.extend(_leaves(group))
    except* OSError as group:  # a listener could not bind, the data dir is unusable, ...
        failed.extend(_leaves(group))
    for problem in unusable:
        print(f"gridgate: {problem}", file=sys.stderr)
    if unusable:
        return EXIT_CONFIG
    for exc in failed:
        if isinstance(exc, ListenError):   # names the listener and its address itself
            log.error("%s", exc)
        else:
            log.error("cannot start: %s", exc)
    return 1 if failed else 0


def _workers_arg(text: str) -> int | str:
    """``--workers``: a count as an int, anything else as given ([service] workers judges it)."""
    return int(text) if text.isdigit() else text


def _leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The errors themselves, however deep the nurseries nested them."""
    out: list[E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


def _reload_config(path: str | None, overrides: dict[str, dict[str, Any]], log: logging.Logger) -> Config | None:
    """SIGHUP: the config read again the way it was at start (file, environment,
    flags); None, with every problem logged, when it is unusable."""
    from gridgate.config import Config, ConfigError

    try:
        return Config.load(path, overrides=overrides)
    except ConfigError as exc:
        log.error("SIGHUP: the new configuration is unusable, keeping the running one:\n%s",
                  "\n".join(f"  - {p}" for p in exc.problems))
        return None


async def _serve_until_stopped(config: Config, log: logging.Logger,
                               reload: Callable[[], Config | None] | None = None, *,
                               reuse_port: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    import trio

    from gridgate.gateway import Gateway, serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run_gateway(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(config, reuse_port=reuse_port, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: end the signal watcher too

            gateway = await nursery.start(run_gateway)
            if config.cluster.nats_servers:
                from gridgate.cluster.node import ClusterNode

                await nursery.start(ClusterNode(gateway, config.cluster).run)
            if on_ready is not None:
                on_ready()
            count = 0
            async for signum in signals:
                if signum == signal.SIGHUP:
                    gateway.reload_credentials()      # problems are logged; the old set stays
                    new = reload() if reload is not None else None
                    if new is not None:
                        gateway.reload(new)
                    else:
                        gateway.metrics.reloads.labels("failed").inc()
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    log.info("received %s: stopping gracefully (send it again to stop at once)", name)
                    gateway.stop()
                else:
                    log.warning("received %s again: stopping now", name)
                    nursery.cancel_scope.cancel()


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    print(config.to_toml(), end="")
    return 0


def _data_dir(arg: str | None) -> str:
    if arg is not None:
        return arg
    import os

    return os.environ.get("GRIDGATE_SPOOL_DATA_DIR", "./gridgate-data")


def _cmd_spool(args: argparse.Namespace) -> int:
    from gridgate.storage import spool_cli

    data_dir = _data_dir(args.data_dir)
    if args.spool_command == "stats":
        return spool_cli.stats_command(data_dir)
    return spool_cli.export_command(data_dir, rejected=args.rejected, limit=args.limit)


def _cmd_passwd(args: argparse.Namespace) -> int:
    from gridgate.security import passwd_file

    return passwd_file.passwd_command(args.file, args.id, args.password, args.iterations)


def _cmd_admin_token(args: argparse.Namespace) -> int:
    from gridgate.security.admin_tokens import entry_toml, new_token

    token = new_token()
    try:
        entry = entry_toml(args.name, token, args.scopes)
    except ValueError as exc:
        print(f"gridgate admin-token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The token on stdout alone (for `TOKEN=$(gridgate admin-token ...)`),
    # the entry on stderr: only its digest, safe to paste into the file.
    print(token)
    print(f"# add to [admin] tokens_file; the token above is shown only now\n{entry}", end="", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # for the workers of --workers N
    if args.version:
        print(_version_text())
        return 0
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "check-config":
        return _cmd_check_config(args)
    if args.command == "spool":
        return _cmd_spool(args)
    if args.command == "passwd":
        return _cmd_passwd(args)
    if args.command == "admin-token":
        return _cmd_admin_token(args)
    parser.print_help()
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
