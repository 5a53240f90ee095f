"""A real local cluster for proxy tests: writable + read-only nodes + Mishards, all subprocesses."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import LOCALHOST, ManagedProcess, NodeProcess, cmd_version_probe, free_port


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
            }
        )
        env.update(extra_env or {})
        super().__init__(
            name=f"mishards@{self.port}",
            argv=[sys.executable, "-m", "mishards"],
            probe=cmd_version_probe(self.address),
            log_path=log_dir / f"mishards-{self.port}.log",
            env=env,
        )

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


def start_cluster(meta_uri: str, base: Path, readonly: int = 2, proxy_env: dict[str, str] | None = None) -> Cluster:
    data = base / "data"
    data.mkdir()
    logs = base / "logs"
    started = []
    try:
        writable = NodeProcess("writable", meta_uri, data, log_dir=logs).start()
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
