"""Self-test of tests/support/processes.py and the MySQL fixture, with a tiny gRPC server script."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.support.processes import (
    ManagedProcess,
    ProcessStartError,
    cmd_version_probe,
    free_port,
    port_is_free,
)

TINY_SERVER = """
import signal, sys, threading
from concurrent import futures
import grpc
from milvus_grpc import milvus_pb2, milvus_pb2_grpc

class Servicer(milvus_pb2_grpc.MilvusServiceServicer):
    def Cmd(self, request, context):
        return milvus_pb2.StringReply(string_reply="0.9.1")

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
milvus_pb2_grpc.add_MilvusServiceServicer_to_server(Servicer(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("serving", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.wait(0.2):  # timed: a signal taken by a gRPC thread still reaches the handler
    pass
server.stop(grace=None)
"""


def tiny(tmp_path: Path, code: str = TINY_SERVER, start_timeout_s: float = 20.0) -> ManagedProcess:
    port = free_port()
    return ManagedProcess(
        name="tiny",
        argv=[sys.executable, "-c", code, str(port)],
        probe=cmd_version_probe(f"127.0.0.1:{port}", timeout_s=0.5),
        log_path=tmp_path / "tiny.log",
        start_timeout_s=start_timeout_s,
    )


def test_start_pause_resume_stop(tmp_path: Path) -> None:
    with tiny(tmp_path) as proc:
        assert proc.alive() and proc.probe()
        proc.pause()
        assert not proc.probe()  # a stopped process holds its port but answers nothing
        proc.resume()
        assert proc.probe()
    assert proc.returncode == 0  # SIGTERM handled: a clean stop
    assert "serving" in (tmp_path / "tiny.log").read_text()


def test_stop_reaches_a_paused_process(tmp_path: Path) -> None:
    proc = tiny(tmp_path).start()
    proc.pause()
    assert proc.stop(timeout_s=10) == 0


def test_kill(tmp_path: Path) -> None:
    proc = tiny(tmp_path).start()
    assert proc.kill() == -signal.SIGKILL
    assert not proc.alive()


def test_early_exit_reports_the_log_tail(tmp_path: Path) -> None:
    code = "import sys; print('boom: bad config', file=sys.stderr); sys.exit(3)"
    with pytest.raises(ProcessStartError, match=r"(?s)exited with code 3.*boom: bad config"):
        tiny(tmp_path, code).start()


def test_startup_is_bounded(tmp_path: Path) -> None:
    proc = tiny(tmp_path, "import time; time.sleep(60)", start_timeout_s=1)
    with pytest.raises(ProcessStartError, match="not ready within 1 s"):
        proc.start()
    assert proc.returncode == -signal.SIGKILL


def test_free_port_is_free() -> None:
    assert port_is_free(free_port())


def test_mysql_db_url_is_a_fresh_empty_database(mysql_db_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(mysql_db_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT DATABASE()")).scalar_one().startswith("test_")
            assert conn.execute(sa.text("SHOW TABLES")).all() == []
            conn.execute(sa.text("CREATE TABLE t (id INT PRIMARY KEY)"))
    finally:
        engine.dispose()
