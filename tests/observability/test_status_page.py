"""The side port's status page in headless Chromium, its JSON twin and the probes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from milvus_grpc import milvus_pb2 as pb
from tests.support.processes import ROOT
from tests.support.stubs import milvus_stub

from .conftest import COLLECTION, ROWS, SEGMENTS, ObservedCluster

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / ".run" / "screenshots" / "status-page.png"  # kept after the run for a person to look at


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; CI installs it (scripts/install_chromium.sh), elsewhere a missing one skips."""
    path = shutil.which("chromium")
    if path is None and os.environ.get("CI") == "true":
        subprocess.run([str(ROOT / "scripts" / "install_chromium.sh")], check=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed: run scripts/install_chromium.sh (CI=true does it itself)")
    return path


def run_chromium(chromium: str, profile: Path, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """One headless run with a fresh profile; on timeout its whole process group (ours) is killed."""
    proc = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def test_status_json_lists_nodes_and_file_spread(observed: ObservedCluster):
    status, body = observed.get("/status.json")
    assert status == 200
    snapshot = json.loads(body)
    assert snapshot["ready"] is True
    nodes = {n["address"]: n for n in snapshot["nodes"]}
    assert nodes[observed.writable.address]["role"] == "writable"
    for node in observed.readonly:
        assert nodes[node.address]["role"] == "readonly" and nodes[node.address]["healthy"] is True
    (entry,) = [c for c in snapshot["collections"] if c["collection"] == COLLECTION]
    assert entry["files"] == SEGMENTS and entry["rows"] == ROWS
    assert sum(s["files"] for s in entry["spread"]) == SEGMENTS
    assert {s["node"] for s in entry["spread"]} <= {n.address for n in observed.readonly}
    assert "sqlite:///" not in body, "the meta DB URI stays out of the page"


def test_status_json_shows_uptime_settings_and_request_rates(observed: ObservedCluster):
    with milvus_stub(observed.proxy.address) as stub:
        for _ in range(3):
            stub.HasCollection(pb.CollectionName(collection_name=COLLECTION), timeout=20)
    snapshot = json.loads(observed.get("/status.json")[1])
    assert snapshot["uptime_s"] > 0 and snapshot["started_at"]
    settings = snapshot["settings"]
    assert settings["rpc_transport"] == "http2" and settings["tracer"] == "jaeger"
    assert settings["discovery"] == "static" and settings["meta_db"] == "sqlite file"
    assert settings["timeout_s"] == 20 and settings["health_check"]["interval_s"] == 2
    rows = {row["method"]: row for row in snapshot["requests"]}
    has = rows["HasCollection"]
    assert has["requests"] >= 3 and has["errors"] == 0 and has["requests_per_s"] > 0
    assert has["latency_ms"][0] is not None and has["latency_ms"][0] <= has["latency_ms"][1]
    page = observed.get("/")[1]
    assert "Settings in effect" in page and "Requests" in page and "p99 ms" in page
    assert "upper bounds of the histogram bucket" in page, "the latency legend"
    assert re.search(r"up \d\d:\d\d:\d\d", page)


def test_probes(observed: ObservedCluster):
    assert observed.get("/healthz") == (200, "ok\n")
    assert observed.get("/readyz") == (200, "ok\n")
    assert observed.get("/nope")[0] == 404


def test_status_page_in_headless_chromium(observed: ObservedCluster, chromium: str, tmp_path: Path):
    url = observed.http + "/"
    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>Mishards status</h1>" in dom.stdout
    for node in [observed.writable, *observed.readonly]:
        assert node.address in dom.stdout
    assert COLLECTION in dom.stdout and "healthy" in dom.stdout

    shot = tmp_path / "status-page.png"
    result = run_chromium(
        chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars", url
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
