"""A real local cluster for proxy tests: writable + read-only nodes + Mishards, all subprocesses."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import pytest

from tests.support.processes import (
    LOCALHOST,
    ManagedProcess,
    NodeProcess,
    cmd_version_probe,
    free_port,
    proxy_workers_env,
)
from tests.support.pymilvus_client import PymilvusClient


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


@dataclass
class Cluster:
    meta_uri: str
    data_dir: Path
    writable: NodeProcess
    readonly: list[NodeProcess]
    proxy: MishardsProcess
    reference: NodeProcess  # a `single` node that gets the same data, for comparing results
    processes: list = field(default_factory=list)

    def stop(self) -> None:
        for proc in [self.proxy, *self.readonly, self.writable, self.reference]:
            proc.stop()


def start_cluster(
    meta_uri: str,
    base: Path,
    readonly: int = 2,
    proxy_env: dict[str, str] | None = None,
    writable_args: tuple[str, ...] = (),
) -> Cluster:
    data = base / "data"
    data.mkdir()
    logs = base / "logs"
    started = []
    try:
        writable = NodeProcess("writable", meta_uri, data, log_dir=logs, extra_args=writable_args).start()
        started.append(writable)
        ro_nodes = []
        for _ in range(readonly):
            ro_nodes.append(NodeProcess("readonly", meta_uri, data, log_dir=logs).start())
            started.append(ro_nodes[-1])
        proxy = MishardsProcess(
            woserver=writable.address,
            meta_uri=meta_uri,
            ro_addresses=[n.address for n in ro_nodes],
            log_dir=logs,
            extra_env=proxy_env,
        ).start()
        started.append(proxy)
        ref_data = base / "reference"
        ref_data.mkdir()
        reference = NodeProcess("single", f"sqlite:///{ref_data}/meta.sqlite", ref_data, log_dir=logs).start()
    except BaseException:
        for proc in started:
            proc.stop()
        raise
    return Cluster(meta_uri, data, writable, ro_nodes, proxy, reference)


@pytest.fixture(scope="module")
def cluster(module_meta_uri, tmp_path_factory):
    c = start_cluster(module_meta_uri, tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


# pymilvus on the proxy and on the reference node, for tests comparing the two
@pytest.fixture(scope="module")
def clients(cluster):
    with (
        PymilvusClient(cluster.proxy.host, cluster.proxy.port) as proxy,
        PymilvusClient(cluster.reference.host, cluster.reference.port) as reference,
    ):
        yield proxy, reference


@pytest.fixture
def both(clients, request):
    """Run the same call on the proxy and on the reference node; return both results."""
    proxy, reference = clients
    name = "c_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:60]

    def call(method, *args, **kwargs):
        return getattr(proxy, method)(*args, **kwargs), getattr(reference, method)(*args, **kwargs)

    yield name, call
    call("drop_collection", name)


def same_search(got, want):
    (status_a, result_a), (status_b, result_b) = got, want
    assert status_a.code == status_b.code, (status_a, status_b)
    if status_a.code != 0:
        return
    assert result_a.shape == result_b.shape
    for row_a, row_b, dist_a, dist_b in zip(
        result_a.ids, result_b.ids, result_a.distances, result_b.distances, strict=True
    ):
        assert row_a == row_b
        np.testing.assert_allclose(dist_a, dist_b, rtol=1e-5, atol=1e-4)
