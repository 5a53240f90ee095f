"""examples/quickstart.py against `make run`'s local cluster, with pymilvus installed as a user would.

The client lives in a virtualenv of its own made by `pip install pymilvus==0.2.12` (which brings a
current protobuf), cached under .cache/ for later runs; the only help it gets is the example's
own `legacy_pymilvus.py`, the step README tells users to take.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import LOCALHOST, ROOT, free_port

USER_VENV = ROOT / ".cache" / "user-client-0.2.12"
READY_LINE = "Ctrl-C stops the cluster."


def _user_client_python() -> Path:
    """bin/python of a virtualenv where `pip install pymilvus==0.2.12` ran (made once, atomically)."""
    python = USER_VENV / "bin" / "python"
    if (USER_VENV / ".complete").exists():
        return python
    staging = USER_VENV.with_name(USER_VENV.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, timeout=300)
    result = subprocess.run(
        [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "pymilvus==0.2.12"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        message = f"pip install pymilvus==0.2.12 failed: {result.stderr[-1500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    (staging / ".complete").write_text("pymilvus==0.2.12\n")
    shutil.rmtree(USER_VENV, ignore_errors=True)
    staging.rename(USER_VENV)  # a venv's python finds its site-packages relative to itself
    return python


@pytest.fixture(scope="module")
def user_python() -> Path:
    return _user_client_python()


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory) -> Iterator[int]:
    """scripts/local_cluster.py (what `make run` runs) on free ports; yields the proxy port."""
    base = tmp_path_factory.mktemp("make-run")
    ports = [free_port() for _ in range(5)]
    env = dict(
        os.environ,
        MILVUS_RUN_DATA_DIR=str(base / "cluster"),
        MILVUS_RUN_WO_PORT=str(ports[0]),
        MILVUS_RUN_RO_PORTS=f"{ports[1]},{ports[2]}",
        MILVUS_RUN_PROXY_PORT=str(ports[3]),
        MILVUS_RUN_STATUS_PORT=str(ports[4]),
    )
    out = base / "stdout.txt"
    with open(out, "wb") as stdout, open(base / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.local_cluster"], cwd=ROOT, env=env, stdout=stdout, stderr=stderr
        )
    try:
        deadline = time.monotonic() + 90
        while READY_LINE not in out.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, "the cluster did not come up in 90 s"
            time.sleep(0.2)
        assert READY_LINE in out.read_text(), (base / "stderr.txt").read_text()[-3000:]
        yield ports[3]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.timeout(1200)
def test_quickstart_example_runs_against_make_run(user_python: Path, local_cluster: int, tmp_path: Path):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}  # nothing of ours on the path
    result = subprocess.run(
        [str(user_python), str(ROOT / "examples" / "quickstart.py"), "--host", LOCALHOST, "--port", str(local_cluster)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in (
        "ok   create_collection",
        "ok   insert 2500 vectors",
        "ok   flush",
        "ok   count_entities = 5000",
        "ok   create_index IVF_FLAT",
        "ok   search nq=3 topk=5",
        "ok   get_entity_by_id",
        "ok   delete_entity_by_id [11]",
        "ok   count_entities = 4999",
        "ok   Cmd conn_stats",
        "ok   drop_collection",
        "all steps passed",
    ):
        assert step in result.stdout, result.stdout


def test_pymilvus_as_installed_does_not_import_without_the_shim(user_python: Path, tmp_path: Path):
    """Why README and the example carry legacy_pymilvus.py: a plain install fails at import."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    plain = subprocess.run(
        [str(user_python), "-c", "import milvus"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert plain.returncode != 0
    shimmed = subprocess.run(
        [str(user_python), "-c", "import legacy_pymilvus; import milvus; print(milvus.__version__)"],
        cwd=ROOT / "examples",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shimmed.returncode == 0 and shimmed.stdout.strip() == "0.2.12", shimmed.stderr
