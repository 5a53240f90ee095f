#!/usr/bin/env python3
"""A local cluster in the foreground: Mishards on :19530 over one writable and two read-only nodes.

All nodes share one SQLite meta file and one data directory, as the nodes of a Mishards cluster
share a meta DB and storage; the proxy reads the same meta file. A child that dies is logged and
restarted with backoff (1 s, doubling to 30 s; back to 1 s once it stayed up a minute), as
docker-compose's `restart: on-failure` does, while the others keep serving. Only Ctrl-C or
SIGTERM stops the cluster: every child gets SIGTERM, a bounded wait, then SIGKILL. Each child's
output goes to <data dir>/logs/<name>.log; the proxy logs to stderr only (LOG_PATH empty), so
each of its lines is there once.

Environment: MILVUS_RUN_PROXY_PORT (19530), MILVUS_RUN_WO_PORT (19540), MILVUS_RUN_RO_PORTS
("19541,19542"), MILVUS_RUN_STATUS_PORT (19121: the proxy's status page and metrics; 0 turns
them off), MILVUS_RUN_DATA_DIR (.run/cluster), MILVUS_RUN_START_TIMEOUT_S (30).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.support.processes import (
    LOCALHOST,
    ManagedProcess,
    ProcessStartError,
    cmd_version_probe,
    log_tail,
    port_is_free,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Service:
    """One process of the cluster: what to run and the Milvus port that proves it is ready."""

    name: str
    role: str
    port: int
    argv: list[str]
    env: dict[str, str] | None = None


RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, cap; doubles per restart in a row
STABLE_AFTER_S = 60.0  # a child up this long gets the first delay again on its next death


class Shutdown(Exception):
    """Raised from the signal handler to leave any wait at once."""


def node(name: str, role: str, port: int, data_dir: Path, meta_uri: str) -> Service:
    argv = [
        sys.executable,
        "-m",
        "milvus_node",
        "--role",
        role,
        "--port",
        str(port),
        "--meta-uri",
        meta_uri,
        "--data-dir",
        str(data_dir),
        "--host",
        LOCALHOST,
    ]
    return Service(name, role, port, argv)


def proxy(port: int, wo_port: int, ro_ports: list[int], data_dir: Path, meta_uri: str) -> Service:
    env = dict(
        os.environ,
        WOSERVER=f"tcp://{LOCALHOST}:{wo_port}",
        SQLALCHEMY_DATABASE_URI=meta_uri,
        DISCOVERY_CLASS_NAME="static",
        DISCOVERY_STATIC_HOSTS=",".join(f"{LOCALHOST}:{p}" for p in ro_ports),
        SERVER_HOST=LOCALHOST,
        SERVER_PORT=str(port),
        LOG_PATH="",  # stderr only: this script writes it to logs/mishards.log (a file handler would double it)
        METRICS_HOST=LOCALHOST,
        METRICS_PORT=os.environ.get("MILVUS_RUN_STATUS_PORT", "19121"),
    )
    env.setdefault("LOG_LEVEL", "INFO")
    return Service("mishards", "proxy", port, [sys.executable, "-m", "mishards"], env)


def services(data_dir: Path, proxy_port: int, wo_port: int, ro_ports: list[int]) -> list[Service]:
    """Started in this order (the writable node first: it creates the meta tables; the proxy last)."""
    meta_uri = f"sqlite:///{data_dir / 'db' / 'meta.sqlite'}"
    return [
        node("writable", "writable", wo_port, data_dir, meta_uri),
        *(node(f"readonly-{i}", "readonly", port, data_dir, meta_uri) for i, port in enumerate(ro_ports, start=1)),
        proxy(proxy_port, wo_port, ro_ports, data_dir, meta_uri),
    ]


def print_table(running: list[tuple[Service, ManagedProcess]]) -> None:
    rows = [("NAME", "ROLE", "ADDRESS", "PID", "LOG")]
    rows += [(s.name, s.role, f"{LOCALHOST}:{s.port}", str(p.pid), str(p.log_path)) for s, p in running]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print("Ctrl-C stops the cluster.", flush=True)


@dataclass
class Restarts:
    """One child's restart state: deaths in a row, when it may start next, when it last started."""

    in_a_row: int = 0
    due: float | None = None
    started: float = 0.0


def supervise(running: list[tuple[Service, ManagedProcess]]) -> None:
    """Restart children that die, with backoff, until a signal raises Shutdown (never returns otherwise)."""
    state = {service.name: Restarts(started=time.monotonic()) for service, _ in running}
    while True:
        for service, proc in running:
            restart = state[service.name]
            now = time.monotonic()
            if restart.due is None:
                if proc.alive():
                    if now - restart.started >= STABLE_AFTER_S:
                        restart.in_a_row = 0
                    continue
                delay = min(RESTART_BACKOFF_S[0] * 2**restart.in_a_row, RESTART_BACKOFF_S[1])
                restart.in_a_row += 1
                restart.due = now + delay
                print(
                    f"{service.name} (pid {proc.pid}) exited with code {proc.returncode}; "
                    f"restarting it in {delay:g} s\n"
                    f"--- last lines of {proc.log_path} ---\n{log_tail(proc.log_path, 10)}",
                    file=sys.stderr,
                    flush=True,
                )
            elif now >= restart.due:
                restart.due = None
                restart.started = now
                try:
                    proc.start()  # bounded by the start timeout
                except ProcessStartError as exc:
                    print(f"{service.name} did not restart: {exc}", file=sys.stderr, flush=True)
                    continue
                print(f"restarted {service.name} (pid {proc.pid})", file=sys.stderr, flush=True)
        time.sleep(0.2)


def main() -> int:
    data_dir = Path(os.environ.get("MILVUS_RUN_DATA_DIR", ROOT / ".run" / "cluster")).resolve()
    proxy_port = int(os.environ.get("MILVUS_RUN_PROXY_PORT", "19530"))
    wo_port = int(os.environ.get("MILVUS_RUN_WO_PORT", "19540"))
    ro_ports = [int(p) for p in os.environ.get("MILVUS_RUN_RO_PORTS", "19541,19542").split(",") if p]
    start_timeout_s = float(os.environ.get("MILVUS_RUN_START_TIMEOUT_S", "30"))
    plan = services(data_dir, proxy_port, wo_port, ro_ports)

    busy = [s for s in plan if not port_is_free(s.port)]
    if busy:
        print("ports already in use: " + ", ".join(f"{s.name}:{s.port}" for s in busy), file=sys.stderr)
        return 1
    try:
        (data_dir / "db").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"cannot create the data directory: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    running: list[tuple[Service, ManagedProcess]] = []
    try:
        for service in plan:
            proc = ManagedProcess(
                service.name,
                service.argv,
                cmd_version_probe(f"{LOCALHOST}:{service.port}"),
                log_path=data_dir / "logs" / f"{service.name}.log",
                env=service.env,
                start_timeout_s=start_timeout_s,
            )
            running.append((service, proc))
            proc.start()
        print_table(running)
        supervise(running)
    except ProcessStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Shutdown as exc:
        print(f"{exc}: stopping the cluster", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the cleanup even on a second Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for service, proc in reversed(running):
            code = proc.stop(timeout_s=10)
            print(f"stopped {service.name} (pid {proc.pid}, exit code {code})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
