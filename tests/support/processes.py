"""Child processes for tests and the local cluster: start, wait until ready, stop by PID.

Every server under test (the compact node now, the proxy later) runs as a real subprocess, so a
test sees exactly what a client sees, and can kill, pause or restart it. Readiness is a bounded
poll of a probe (for Milvus-speaking servers: `Cmd(cmd="version")` over gRPC); a process that
exits or does not get ready in time is killed and reported with the tail of its log.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from milvus_grpc import milvus_pb2, milvus_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"

Probe = Callable[[], bool]
# How many worker processes (SERVER_WORKERS) the proxies that tests start run: unset, the proxy's
# default (one process); `MISHARDS_TEST_WORKERS=2 make test` runs every proxy test with two.
TEST_WORKERS_VARIABLE = "MISHARDS_TEST_WORKERS"

# Processes started by this interpreter and not yet stopped; killed at exit so an aborted
# test run does not leave servers behind.
_running: dict[int, ManagedProcess] = {}


class ProcessStartError(RuntimeError):
    """A child exited or did not answer its readiness probe in time."""


def free_port(host: str = LOCALHOST) -> int:
    """A port that was free a moment ago (the OS picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when nothing listens on host:port, so a readiness probe cannot hit a stranger.

    SO_REUSEADDR, as the servers set it: connections of a stopped server still in TIME_WAIT do not
    make the port look taken, only a listener (or a socket bound without it) does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def proxy_workers_env() -> dict[str, str]:
    """SERVER_WORKERS for a proxy under test, from MISHARDS_TEST_WORKERS (empty when unset)."""
    workers = os.environ.get(TEST_WORKERS_VARIABLE, "").strip()
    return {"SERVER_WORKERS": workers} if workers else {}


def descendants(pid: int) -> list[int]:
    """The PIDs of a process's children, grandchildren, ... (from /proc; [] once it is gone)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def cmd_version_probe(address: str, timeout_s: float = 1.0) -> Probe:
    """A probe that is true once `Cmd(cmd="version")` answers with SUCCESS at `address`."""

    def probe() -> bool:
        with grpc.insecure_channel(address) as channel:
            stub = milvus_pb2_grpc.MilvusServiceStub(channel)
            try:
                reply = stub.Cmd(milvus_pb2.Command(cmd="version"), timeout=timeout_s)
            except grpc.RpcError:
                return False
            return reply.status.error_code == 0

    return probe


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process: argv + env + readiness probe, stdout and stderr into a log file.

    Signals go to the child's PID only. The child runs in its own session so that a terminal's
    Ctrl-C reaches the parent alone, which then stops its children in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        probe: Probe,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        start_timeout_s: float = 20.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.probe = probe
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code (negative: killed by that signal) afterwards."""
        return None if self._proc is None else self._proc.poll()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the child and block until its probe answers (bounded by start_timeout_s)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _running[self._proc.pid] = self
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if not self.alive():
                self._fail(f"exited with code {self.returncode} before it was ready")
            if self.probe():
                return self
            if time.monotonic() >= deadline:
                self.kill()
                self._fail(f"not ready within {self.start_timeout_s:g} s; killed")
            time.sleep(0.1)

    def _fail(self, what: str) -> None:
        raise ProcessStartError(
            f"{self.name} ({' '.join(self.argv)}) {what}.\n"
            f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
        )

    def _signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self.alive():
            # Continue a paused child first: a SIGTERM queued while it is stopped may be taken
            # by any of its threads on resume instead of the main one, and then go unnoticed.
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        _running.pop(self._proc.pid, None)
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash as the rest of the system sees it."""
        if self._proc is None:
            return None
        self._signal(signal.SIGKILL)
        code = self._proc.wait()
        _running.pop(self._proc.pid, None)
        return code

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class NodeProcess(ManagedProcess):
    """`python -m milvus_node` with a role, meta URI and data dir, on a free (or given) port.

    `module` runs another entry point with the same options (tests.support.crashing_node)."""

    def __init__(
        self,
        role: str,
        meta_uri: str,
        data_dir: Path | str,
        log_dir: Path | None = None,
        port: int | None = None,
        host: str = LOCALHOST,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 20.0,
        module: str = "milvus_node",
    ) -> None:
        self.host = host
        self.port = free_port(host) if port is None else port
        self.role = role
        self.meta_uri = meta_uri
        self.data_dir = data_dir = Path(data_dir)
        argv = [
            sys.executable,
            "-m",
            module,
            "--role",
            role,
            "--port",
            str(self.port),
            "--meta-uri",
            meta_uri,
            "--data-dir",
            str(data_dir),
            "--host",
            host,
            *extra_args,
        ]
        # By default beside the data dir (so under pytest's tmp dir), not inside it.
        log_dir = data_dir.parent / f"{data_dir.name}-logs" if log_dir is None else log_dir
        super().__init__(
            name=f"milvus_node[{role}]@{self.port}",
            argv=argv,
            probe=cmd_version_probe(self.address),
            log_path=log_dir / f"node-{role}-{self.port}.log",
            env=env,
            start_timeout_s=start_timeout_s,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class MishardsProcess(ManagedProcess):
    """`python -m mishards` configured through its original environment variables."""

    def __init__(
        self,
        *,
        woserver: str,
        meta_uri: str,
        ro_addresses: list[str],
        log_dir: Path,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.host = LOCALHOST
        self.port = free_port() if port is None else port
        env = dict(os.environ)
        env.update(
            {
                "WOSERVER": f"tcp://{woserver}",
                "SQLALCHEMY_DATABASE_URI": meta_uri,
                "DISCOVERY_CLASS_NAME": "static",
                "DISCOVERY_STATIC_HOSTS": ",".join(ro_addresses),
                "SERVER_HOST": LOCALHOST,
                "SERVER_PORT": str(self.port),
                "LOG_PATH": str(log_dir / "mishards-logs"),
                "LOG_LEVEL": "INFO",
                "TIMEOUT": "20",
                **proxy_workers_env(),
            }
        )
        env.update(extra_env or {})
        self.workers = int(env.get("SERVER_WORKERS") or 1)
        super().__init__(
            name=f"mishards@{self.port}",
            argv=[sys.executable, "-m", "mishards"],
            probe=self._ready,
            log_path=log_dir / f"mishards-{self.port}.log",
            env=env,
            # with workers, three interpreters start one after the other on a machine shared with others
            start_timeout_s=20.0 if self.workers == 1 else 45.0,
        )
        self._log_start = 0
        self._answers = cmd_version_probe(self.address)

    def start(self) -> Self:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        return super().start()

    def _ready(self) -> bool:
        """`Cmd version` answers; with SERVER_WORKERS > 1 also every worker serves, so a test that
        signals a worker finds them all started: the supervisor opens the side port (METRICS_PORT)
        only then, and logs it at INFO."""
        if self.workers > 1:
            side_port = int(self.env.get("METRICS_PORT") or 0)
            if side_port:
                try:
                    with urllib.request.urlopen(f"http://{LOCALHOST}:{side_port}/healthz", timeout=2) as reply:
                        if reply.status != 200:
                            return False
                except OSError:
                    return False
            else:
                with open(self.log_path, "rb") as log:
                    log.seek(self._log_start)
                    if f"with {self.workers} worker processes".encode() not in log.read():
                        return False
        return self._answers()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@atexit.register
def _kill_leftovers() -> None:
    """Kill, by PID, whatever this interpreter started and nobody stopped."""
    for proc in list(_running.values()):
        proc.kill()
