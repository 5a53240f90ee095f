"""all_in_one/probe_test.py (real pymilvus 0.2.12) and the containers' healthcheck, against a real
node on 127.0.0.1: Pass when the server answers, Error (exit 1) when nothing listens."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.deploy.conftest import ROOT
from tests.support.processes import LOCALHOST, NodeProcess, free_port
from tests.support.wheels import extracted_wheel

PROBE = ROOT / "all_in_one" / "probe_test.py"
HEALTHCHECK = ROOT / "scripts" / "docker_healthcheck.py"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("probe") / "data"
    with NodeProcess("single", f"sqlite:///{data / 'db' / 'meta.sqlite'}", data) as proc:
        yield proc


def run_probe(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The probe as the image runs it: pymilvus 0.2.12 importable, nothing else prepared."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(extracted_wheel("0.2.12"))}
    return subprocess.run(
        [sys.executable, str(PROBE), "--host", LOCALHOST, "--port", str(port), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_probe_passes_against_a_live_server(node: NodeProcess) -> None:
    result = run_probe(node.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Pass: Connected" in result.stdout and "0.9.1" in result.stdout


def test_probe_search_round_trip(node: NodeProcess) -> None:
    result = run_probe(node.port, "--search")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Pass: Searched 5 vectors" in result.stdout


def test_probe_reports_error_when_nothing_listens() -> None:
    result = run_probe(free_port())
    assert result.returncode == 1
    assert "Error: Fail connecting to server on 127.0.0.1" in result.stdout
    assert "Pass" not in result.stdout


def run_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "PORT_VAR", "HOST_VAR"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        timeout=30,
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "[::]", ""])
def test_healthcheck_is_healthy_on_a_live_server(node: NodeProcess, host: str) -> None:
    result = run_healthcheck(PORT_VAR=str(node.port), HOST_VAR=host)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"healthy: 127.0.0.1:{node.port} version 0.9.1")


def test_healthcheck_fails_when_nothing_listens() -> None:
    port = free_port()
    result = run_healthcheck(PORT_VAR=str(port), HOST_VAR="127.0.0.1")
    assert result.returncode == 1
    assert f"unhealthy: 127.0.0.1:{port}" in result.stderr
