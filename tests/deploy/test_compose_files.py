"""Every compose file passes `docker-compose config` (Debian's docker-compose 1.29.2, no engine
needed), and the resolved files fix the original demo's defects: Milvus configs mounted where
Milvus 0.9.1 reads them with the right deploy_mode, only read-only nodes as search targets, the
Jaeger Zipkin port, images our version check accepts, and proxy settings that our proxy accepts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mishards.settings import SUPPORTED_SERVER_VERSIONS
from tests.deploy.conftest import ROOT, require_tool

COMPOSE_FILES = sorted(ROOT.glob("all_in_one*/*.yml"))
COMPOSE_FILES = [path for path in COMPOSE_FILES if "services" in yaml.safe_load(path.read_text())]
MILVUS_CONF = "/var/lib/milvus/conf/server_config.yaml"
DEPLOY_MODE = {"milvus_wr": "cluster_writable", "milvus_ro": "cluster_readonly"}


def compose_config(path: Path) -> dict[str, Any]:
    """The file as docker-compose resolves it (defaults substituted, paths absolute)."""
    tool = require_tool("docker-compose")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [tool, "-f", path.name, "config"], cwd=path.parent, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"docker-compose config {path}: {result.stderr}"
    return yaml.safe_load(result.stdout)


def test_there_are_three_compose_files() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in COMPOSE_FILES}
    assert names == {
        "all_in_one/all_in_one.yml",
        "all_in_one/all_in_one_node.yml",
        "all_in_one_with_mysql/all_in_one_with_mysql.yml",
    }


@pytest.fixture(scope="module", params=COMPOSE_FILES, ids=lambda p: p.name)
def resolved(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    return request.param, compose_config(request.param)


def test_docker_compose_config_reports_an_error_for_a_bad_key(tmp_path: Path) -> None:
    """The validator really validates (so a pass above means something)."""
    bad = tmp_path / "bad.yml"
    bad.write_text('version: "2.4"\nservices:\n  x:\n    image: busybox\n    portz: ["1:1"]\n')
    tool = require_tool("docker-compose")
    result = subprocess.run([tool, "-f", str(bad), "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "portz" in result.stderr


def test_milvus_nodes_read_their_mounted_config(resolved: tuple[Path, dict[str, Any]]) -> None:
    path, config = resolved
    for name, service in config["services"].items():
        if not service["image"].startswith("milvusdb/milvus:"):
            continue
        mounts = dict(reversed(volume.split(":")[:2]) for volume in service["volumes"])
        assert MILVUS_CONF in mounts, f"{path.name}: {name} has no {MILVUS_CONF}"
        milvus_config = yaml.safe_load(Path(mounts[MILVUS_CONF]).read_text())
        assert milvus_config["server_config"]["deploy_mode"] == DEPLOY_MODE[name]
        assert milvus_config["storage_config"]["primary_path"] == "/var/lib/milvus"
        assert mounts["/var/lib/milvus/db"] == "milvus-db", "the nodes share one data volume"
        version = re.match(r"milvusdb/milvus:(\d+\.\d+)\.", service["image"])
        assert version and version.group(1) in SUPPORTED_SERVER_VERSIONS
        assert "-cpu-" in service["image"] and "runtime" not in service


def test_writable_and_read_only_configs_differ_only_in_role_and_wal() -> None:
    for directory in ("all_in_one", "all_in_one_with_mysql"):
        wr = yaml.safe_load((ROOT / directory / "wr_server.yml").read_text())
        ro = yaml.safe_load((ROOT / directory / "ro_server.yml").read_text())
        assert ro["wal_config"]["enable"] is False
        for config in (wr, ro):
            config["server_config"].pop("deploy_mode")
            config["wal_config"].pop("enable")
        assert wr == ro


def test_mysql_variant_points_every_component_at_mysql() -> None:
    config = compose_config(ROOT / "all_in_one_with_mysql" / "all_in_one_with_mysql.yml")
    for name in ("wr", "ro"):
        milvus = yaml.safe_load((ROOT / "all_in_one_with_mysql" / f"{name}_server.yml").read_text())
        assert milvus["db_config"]["backend_url"] == "mysql://root:milvusroot@milvus-mysql:3306/milvus"
    uri = config["services"]["mishards"]["environment"]["SQLALCHEMY_DATABASE_URI"]
    assert uri.startswith("mysql+pymysql://root:milvusroot@milvus-mysql:3306/milvus")
    mysql = config["services"]["milvus-mysql"]
    assert "sleep" not in " ".join(mysql["healthcheck"]["test"]), "a real healthcheck, not the original's sleep 5"
    for name in ("milvus_wr", "milvus_ro", "mishards"):
        assert config["services"][name]["depends_on"]["milvus-mysql"]["condition"] == "service_healthy"


def test_the_sqlite_proxy_reads_the_nodes_meta_file() -> None:
    config = compose_config(ROOT / "all_in_one" / "all_in_one.yml")
    mishards = config["services"]["mishards"]
    assert mishards["environment"]["SQLALCHEMY_DATABASE_URI"] == "sqlite:////var/lib/milvus/db/meta.sqlite"
    assert "milvus-db:/var/lib/milvus/db:rw" in mishards["volumes"]


def test_jaeger_publishes_the_zipkin_port_it_is_told_to_use() -> None:
    for path in (ROOT / "all_in_one" / "all_in_one.yml", ROOT / "all_in_one_with_mysql" / "all_in_one_with_mysql.yml"):
        jaeger = compose_config(path)["services"]["jaeger"]
        published = {port["target"] for port in jaeger["ports"]}
        assert {5775, 16686, 9411} <= published and 9441 not in published
        assert str(jaeger["environment"]["COLLECTOR_ZIPKIN_HTTP_PORT"]) == "9411"


def test_the_node_variant_stays_on_the_host_loopback() -> None:
    config = compose_config(ROOT / "all_in_one" / "all_in_one_node.yml")
    services = config["services"]
    assert all(service["network_mode"] == "host" for service in services.values())
    assert "networks" not in config
    assert services["milvus_wr"]["environment"]["MILVUS_NODE_ROLE"] == "writable"
    assert services["milvus_ro"]["environment"]["MILVUS_NODE_ROLE"] == "readonly"
    for name in ("milvus_wr", "milvus_ro"):
        assert services[name]["environment"]["MILVUS_NODE_HOST"] == "127.0.0.1"
    assert services["mishards"]["environment"]["SERVER_HOST"] == "127.0.0.1"


def test_ports_of_the_node_variant_are_variables(tmp_path: Path) -> None:
    tool = require_tool("docker-compose")
    path = ROOT / "all_in_one" / "all_in_one_node.yml"
    env = {"PATH": os.environ["PATH"], "MISHARDS_PORT": "29530", "MILVUS_WR_PORT": "29540", "MILVUS_RO_PORT": "29541"}
    result = subprocess.run([tool, "-f", str(path), "config"], env=env, capture_output=True, text=True, timeout=60)
    services = yaml.safe_load(result.stdout)["services"]
    proxy = services["mishards"]["environment"]
    assert (proxy["SERVER_PORT"], proxy["WOSERVER"], proxy["DISCOVERY_STATIC_HOSTS"]) == (
        "29530",
        "tcp://127.0.0.1:29540",
        "127.0.0.1:29541",
    )
    assert services["milvus_ro"]["environment"]["MILVUS_NODE_PORT"] == "29541"


def test_search_targets_are_the_read_only_nodes_only(resolved: tuple[Path, dict[str, Any]]) -> None:
    _, config = resolved
    environment = config["services"]["mishards"]["environment"]
    assert environment["DISCOVERY_CLASS_NAME"] == "static"
    assert "DISCOVERY_PLUGIN_PATH" not in environment
    hosts = environment["DISCOVERY_STATIC_HOSTS"].split(",")
    writable = environment["WOSERVER"].removeprefix("tcp://")
    assert writable not in hosts and "milvus_wr" not in hosts


def test_the_proxy_accepts_its_compose_environment(resolved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Settings as the container gets them load without error (a typo fails here, not at deploy)."""
    _, config = resolved
    environment = {key: str(value) for key, value in config["services"]["mishards"]["environment"].items()}
    check = "from mishards.settings import load_settings; s = load_settings(); print(s.woserver)"
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "MISHARDS_ENV_FILE": "none", "LOG_PATH": str(tmp_path), **environment},
    )
    assert result.returncode == 0, result.stderr
