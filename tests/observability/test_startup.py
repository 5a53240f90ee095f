"""Start-up says what is wrong: an unreadable meta DB, bad configuration, a developer's .env, noisy logs.

Real processes throughout: the proxy (`python -m mishards`), real nodes, MariaDB from
scripts/test.sh behind a TCP forwarder that the test switches on (the "DB comes back" moment).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mishards import settings as settings_module
from tests.conftest import fresh_mysql_database
from tests.support.processes import LOCALHOST, ManagedProcess, NodeProcess, free_port, proxy_workers_env
from tests.support.stubs import milvus_stub

from .conftest import http_get

ROOT = Path(__file__).resolve().parents[2]
RECOVERY_S = 5.0  # /readyz must turn 200 within this long of the DB coming back


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without Mishards variables, reading no .env file."""
    keep = {k: v for k, v in os.environ.items() if not k.isupper() or k.split("_")[0] in ("PATH", "HOME", "LANG")}
    keep.update({"PATH": os.environ["PATH"], "MISHARDS_ENV_FILE": "none"})
    keep.update(extra)
    return keep


class ProxyProcess(ManagedProcess):
    """`python -m mishards` with the side port on, ready when /healthz answers (the meta DB may be down)."""

    def __init__(self, base: Path, woserver: str, meta_uri: str, **extra: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.http = f"http://{LOCALHOST}:{self.http_port}"
        settings = dict(
            WOSERVER=f"tcp://{woserver}",
            SQLALCHEMY_DATABASE_URI=meta_uri,
            DISCOVERY_STATIC_HOSTS=woserver,
            SERVER_HOST=LOCALHOST,
            SERVER_PORT=str(self.port),
            METRICS_HOST=LOCALHOST,
            METRICS_PORT=str(self.http_port),
            HEALTH_CHECK_INTERVAL="0.5",
            HEALTH_CHECK_TIMEOUT="0.5",
            LOG_LEVEL="INFO",
            LOG_PATH=str(base / "proxy-logs"),
            TIMEOUT="10",
            **proxy_workers_env(),
        )
        env = _clean_env(**{**settings, **extra})
        super().__init__(
            name=f"mishards@{self.port}",
            argv=[sys.executable, "-m", "mishards"],
            probe=lambda: _get(self.http + "/healthz")[0] == 200,
            log_path=base / f"mishards-{self.port}.log",
            env=env,
            start_timeout_s=20.0 if int(env.get("SERVER_WORKERS") or 1) == 1 else 45.0,  # 3 interpreters
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _get(url: str) -> tuple[int, str]:
    try:
        return http_get(url, timeout=3)
    except OSError:
        return 0, ""


def _wait_ready(proxy: ProxyProcess, timeout_s: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _get(proxy.http + "/readyz")
        if status[0] == 200 or time.monotonic() >= deadline:
            return status
        time.sleep(0.1)


def _assert_not_ready_because_of_the_meta_db(proxy: ProxyProcess, why: str) -> None:
    code, body = _get(proxy.http + "/readyz")
    assert code == 503 and body.startswith("meta DB unreadable: ") and why in body, (code, body)
    snapshot = json.loads(_get(proxy.http + "/status.json")[1])
    assert snapshot["ready"] is False and snapshot["ready_reason"] == body.strip()
    assert why in snapshot["meta_error"]
    warnings = [line for line in proxy.log().splitlines() if "WARNING mishards.meta: meta DB unreadable" in line]
    assert warnings and why in warnings[0], proxy.log()[-3000:]


@pytest.mark.timeout(120)
def test_missing_sqlite_meta_db_warns_fails_readiness_and_recovers(tmp_path: Path):
    data = tmp_path / "not-yet"  # neither the directory nor meta.sqlite exist
    meta_uri = f"sqlite:///{data}/db/meta.sqlite"
    wo_port = free_port()
    with ProxyProcess(tmp_path, f"{LOCALHOST}:{wo_port}", meta_uri) as proxy:
        _assert_not_ready_because_of_the_meta_db(proxy, "does not exist")
        assert not (data / "db" / "meta.sqlite").exists(), "the proxy must not create an empty meta DB"
        with NodeProcess("writable", meta_uri, data, port=wo_port, log_dir=tmp_path):  # creates the meta DB
            came_back = time.monotonic()
            code, body = _wait_ready(proxy, RECOVERY_S + 5)
            assert code == 200, body
            assert time.monotonic() - came_back <= RECOVERY_S
            assert "INFO mishards.meta: meta DB readable again" in proxy.log()
            assert json.loads(_get(proxy.http + "/status.json")[1])["meta_error"] == ""


class Forwarder:
    """A TCP forwarder on a fixed port to a real server; not listening until `start` (the DB 'comes back')."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()

    def start(self) -> None:
        self._listener = socket.create_server((LOCALHOST, self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            if sock is not None:
                sock.close()


@pytest.mark.timeout(180)
def test_unreachable_mysql_meta_db_warns_fails_readiness_and_recovers(tmp_path: Path, mysql_url: str):
    import sqlalchemy as sa

    with fresh_mysql_database(mysql_url) as database_url:
        # the writable node reaches MySQL directly and creates the schema; the proxy goes through the forwarder
        with NodeProcess("writable", database_url, tmp_path / "data", log_dir=tmp_path) as writable:
            real = sa.make_url(database_url)
            forwarder = Forwarder(free_port(), (real.host, real.port))
            via_forwarder = real.set(host=LOCALHOST, port=forwarder.port).render_as_string(hide_password=False)
            try:
                with ProxyProcess(tmp_path, writable.address, via_forwarder) as proxy:
                    _assert_not_ready_because_of_the_meta_db(proxy, "cannot read the meta DB (mysql)")
                    assert f":{real.password}@" not in proxy.log(), "no password in the log"
                    with milvus_stub(f"{LOCALHOST}:{proxy.port}") as stub:
                        from milvus_grpc import milvus_pb2 as pb

                        param = pb.SearchParam(collection_name="anything", topk=1)
                        assert stub.Search(param, timeout=20).status.error_code != 0
                    failure = r"WARNING mishards\.failures: Search failed: code \d+, collection 'anything'"
                    assert re.search(failure, proxy.log()), proxy.log()[-2000:]
                    forwarder.start()
                    came_back = time.monotonic()
                    code, body = _wait_ready(proxy, RECOVERY_S + 5)
                    assert code == 200, body
                    assert time.monotonic() - came_back <= RECOVERY_S
            finally:
                forwarder.close()


# ---------------------------------------------------------------------------------- configuration errors
def _taken_port() -> socket.socket:
    return socket.create_server((LOCALHOST, 0))


@pytest.mark.parametrize(
    "case",
    [
        "missing WOSERVER",
        "nonsense URI",
        "driver not installed",
        "unknown tracer",
        "unknown router",
        "empty static hosts",
        "metrics port taken",
        "server port taken",
        "bad integer",
        "env file missing",
    ],
)
def test_each_configuration_error_is_one_line_naming_the_variable_and_exit_2(case: str, tmp_path: Path):
    held = _taken_port()
    taken = str(held.getsockname()[1])
    base = {
        "WOSERVER": "tcp://127.0.0.1:1",
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/meta.sqlite",
        "DISCOVERY_STATIC_HOSTS": "127.0.0.1:2",
        "SERVER_HOST": LOCALHOST,
        "SERVER_PORT": str(free_port()),
        "METRICS_HOST": LOCALHOST,
        "LOG_PATH": str(tmp_path / "logs"),
    }
    changes, variable, also = {
        "missing WOSERVER": ({"WOSERVER": ""}, "WOSERVER", ""),
        "nonsense URI": ({"SQLALCHEMY_DATABASE_URI": "nonsense"}, "SQLALCHEMY_DATABASE_URI", "not a database URL"),
        "driver not installed": (
            {"SQLALCHEMY_DATABASE_URI": "mysql+mysqldb://u:secretpw@h/db"},
            "SQLALCHEMY_DATABASE_URI",
            "",
        ),
        "unknown tracer": ({"TRACER_CLASS_NAME": "zipkin"}, "TRACER_CLASS_NAME", "jaeger, opentelemetry"),
        "unknown router": ({"ROUTER_CLASS_NAME": "nope"}, "ROUTER_CLASS_NAME", "filebasedhashringrouter"),
        "empty static hosts": ({"DISCOVERY_STATIC_HOSTS": ""}, "DISCOVERY_STATIC_HOSTS", ""),
        "metrics port taken": ({"METRICS_PORT": taken}, "METRICS_PORT", "in use"),
        "server port taken": ({"SERVER_PORT": taken}, "SERVER_PORT", "in use"),
        "bad integer": ({"MAX_RETRY": "three"}, "MAX_RETRY", "'three'"),
        "env file missing": ({"MISHARDS_ENV_FILE": str(tmp_path / "absent.env")}, "MISHARDS_ENV_FILE", ""),
    }[case]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mishards"],
            env=_clean_env(**{**base, **changes}),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        held.close()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mishards: configuration error: ") and variable in lines[0], lines[0]
    assert also.lower() in lines[0].lower(), lines[0]
    assert "secretpw" not in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------------- a developer's .env
def test_a_developer_dotenv_does_not_reach_the_test_processes(tmp_path: Path):
    """The test session sets MISHARDS_ENV_FILE=none, and child processes inherit it; without it the
    same child reads the .env (so this test can fail)."""
    dotenv = tmp_path / "developer.env"
    dotenv.write_text("MAX_RETRY=77\nDISCOVERY_STATIC_HOSTS=developer-box:19530\n")
    assert os.environ.get("MISHARDS_ENV_FILE") == "none"
    check = "from mishards.settings import load_settings; s = load_settings(); print(s.max_retry)"
    env = {**os.environ, "WOSERVER": "tcp://h:1", "SQLALCHEMY_DATABASE_URI": "sqlite:////tmp/m.sqlite"}
    env.pop("MAX_RETRY", None)
    isolated = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert isolated.stdout.strip() == "3", isolated.stderr
    env["MISHARDS_ENV_FILE"] = str(dotenv)
    reads = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert reads.stdout.strip() == "77", reads.stderr


def test_the_lookup_would_find_mishards_dotenv_in_the_checkout():
    """The default lookup's first place is mishards/.env beside the package (README's quick start)."""
    assert settings_module.PACKAGE_DIR == ROOT / "mishards"
    env = {k: v for k, v in os.environ.items() if k != "MISHARDS_ENV_FILE"}
    assert settings_module._dotenv_file(env) in (None, ROOT / "mishards" / ".env", ROOT / ".env")
    assert settings_module._dotenv_file({"MISHARDS_ENV_FILE": "none"}) is None


# ---------------------------------------------------------------------------------- quiet logs
@pytest.mark.timeout(120)
def test_debug_logs_are_not_drowned_in_protocol_frames(tmp_path: Path):
    meta_uri = f"sqlite:///{tmp_path}/data/db/meta.sqlite"
    with NodeProcess("writable", meta_uri, tmp_path / "data", log_dir=tmp_path) as writable:
        with ProxyProcess(tmp_path, writable.address, meta_uri, LOG_LEVEL="DEBUG") as proxy:
            from milvus_grpc import milvus_pb2 as pb

            with milvus_stub(f"{LOCALHOST}:{proxy.port}") as stub:
                for _ in range(5):
                    stub.Cmd(pb.Command(cmd="version"), timeout=10)
                    stub.HasCollection(pb.CollectionName(collection_name="none_here"), timeout=10)
                    stub.Search(pb.SearchParam(collection_name="none_here", topk=1), timeout=10)
    lines = [line for line in proxy.log().splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    loggers = [line.split(" ", 4)[3].rstrip(":") for line in lines if len(line.split(" ", 4)) > 4]
    noisy = [name for name in loggers if name.split(".")[0] in ("hpack", "h2", "grpc", "urllib3", "kubernetes")]
    assert lines and not noisy, f"{len(noisy)} of {len(lines)} lines from protocol libraries"
