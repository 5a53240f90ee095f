"""kubernetes_demo/ passes `kubernetes-validate --strict` (offline schemas of current Kubernetes
releases) and fixes the original demo: current API versions, Milvus images our version check
accepts, configs at the path Milvus reads with the right deploy_mode, probes everywhere, RBAC
that lets the proxy's discovery list and watch pods, all in one namespace.
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

DEMO = ROOT / "kubernetes_demo"
MANIFESTS = sorted(DEMO.glob("*.yaml"))
NAMESPACE = "mishards"


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return find(kind, name)["spec"]["template"]["spec"]


def test_kubernetes_validate_strict_passes() -> None:
    tool = require_tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate")
    result = subprocess.run(
        [tool, "--strict", "--quiet", *map(str, MANIFESTS)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validator really is strict (so a pass above means something)."""
    tool = require_tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate")
    bad = yaml.safe_load((DEMO / "mishards_proxy.yaml").read_text().split("---")[-1])
    bad["spec"]["replicaz"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [tool, "--strict", "--quiet", str(tmp_path / "bad.yaml")], capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0


def test_everything_is_in_the_demo_namespace_on_current_api_versions() -> None:
    for doc in documents():
        assert "beta" not in doc["apiVersion"], doc["apiVersion"]
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_start_sh_applies_every_manifest() -> None:
    script = (DEMO / "start.sh").read_text()
    assert {path.name for path in MANIFESTS} == set(re.findall(r"mishards_\w+\.yaml", script))


def test_milvus_images_are_versions_the_proxy_accepts() -> None:
    for kind, name in (("Deployment", "mishards-wo-servers"), ("StatefulSet", "mishards-ro-servers")):
        (container,) = pod_spec(kind, name)["containers"]
        version = re.match(r"milvusdb/milvus:(\d+\.\d+)\.\d+-", container["image"])
        assert version and version.group(1) in SUPPORTED_SERVER_VERSIONS, container["image"]


@pytest.mark.parametrize(
    ("kind", "name", "configmap", "mode"),
    [
        ("Deployment", "mishards-wo-servers", "mishards-woserver-config", "cluster_writable"),
        ("StatefulSet", "mishards-ro-servers", "mishards-roserver-config", "cluster_readonly"),
    ],
)
def test_milvus_config_is_mounted_where_milvus_reads_it(kind: str, name: str, configmap: str, mode: str) -> None:
    """From a Secret: the file carries the DB password (Milvus 0.9 reads backend_url only there)."""
    spec = pod_spec(kind, name)
    (container,) = spec["containers"]
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    config_mount = mounts["/var/lib/milvus/conf/server_config.yaml"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes[config_mount["name"]]["secret"]["secretName"] == configmap
    milvus = yaml.safe_load(find("Secret", configmap)["stringData"][config_mount["subPath"]])
    assert milvus["server_config"]["deploy_mode"] == mode
    assert milvus["db_config"]["backend_url"] == "mysql://root:milvusroot@mishards-mysql:3306/milvus"
    assert volumes[mounts["/var/lib/milvus/db"]["name"]]["persistentVolumeClaim"]["claimName"] == "mishards-db-disk"


def test_the_shared_data_claim_is_read_write_many() -> None:
    assert find("PersistentVolumeClaim", "mishards-db-disk")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_container_has_readiness_and_liveness_probes() -> None:
    for doc in documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert "readinessProbe" in container and "livenessProbe" in container, doc["metadata"]["name"]


def test_the_writable_node_is_never_doubled_during_a_rollout() -> None:
    assert find("Deployment", "mishards-wo-servers")["spec"]["strategy"]["type"] == "Recreate"


def test_discovery_matches_the_read_only_pods() -> None:
    proxy_env = find("ConfigMap", "mishards-proxy-configmap")["data"]
    statefulset = find("StatefulSet", "mishards-ro-servers")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    key, value = proxy_env["DISCOVERY_KUBERNETES_LABEL_SELECTOR"].split("=")
    assert labels[key] == value
    assert re.fullmatch(proxy_env["DISCOVERY_KUBERNETES_POD_PATT"], "mishards-ro-servers-0")
    assert proxy_env["DISCOVERY_KUBERNETES_NAMESPACE"] == NAMESPACE
    assert proxy_env["WOSERVER"] == "tcp://mishards-wo-servers:19530"
    find("Service", "mishards-wo-servers")


def test_the_proxy_service_account_may_list_and_watch_pods() -> None:
    spec = pod_spec("Deployment", "mishards-proxy")
    account = spec["serviceAccountName"]
    find("ServiceAccount", account)
    bindings = [
        doc
        for doc in documents()
        if doc["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in doc["subjects"]
    ]
    assert bindings
    role = find("Role", bindings[0]["roleRef"]["name"])
    pod_rules = [rule for rule in role["rules"] if "pods" in rule["resources"]]
    assert pod_rules and {"list", "watch"} <= set(pod_rules[0]["verbs"])


def test_the_proxy_runs_as_non_root_on_port_19530() -> None:
    spec = pod_spec("Deployment", "mishards-proxy")
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert [port["containerPort"] for port in container["ports"]] == [19530, 19121]  # API, side port
    service = find("Service", "mishards-proxy-servers")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["port"] == 19530


def test_no_password_in_a_configmap_and_the_proxy_reads_its_uri_from_the_secret() -> None:
    for doc in documents():
        if doc["kind"] == "ConfigMap":
            assert "milvusroot" not in yaml.safe_dump(doc), doc["metadata"]["name"]
    (container,) = pod_spec("Deployment", "mishards-proxy")["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["SQLALCHEMY_DATABASE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mishards-mysql-secret"
    (mysql,) = pod_spec("Deployment", "mishards-mysql")["containers"]
    env = {item["name"]: item for item in mysql["env"]}
    assert env["MYSQL_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mishards-mysql-secret"
    secret = find("Secret", "mishards-mysql-secret")["stringData"]
    assert secret["MYSQL_ROOT_PASSWORD"] in secret["SQLALCHEMY_DATABASE_URI"]


def test_the_proxy_side_port_is_on_probed_and_scraped() -> None:
    config = find("ConfigMap", "mishards-proxy-configmap")["data"]
    template = find("Deployment", "mishards-proxy")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == int(config["METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == config["METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_rendered_manifests_with_another_image_and_namespace_pass_strict_validation(tmp_path: Path) -> None:
    tool = require_tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate")
    out = tmp_path / "rendered"
    env = {**os.environ, "NAMESPACE": "vectors-prod", "PROXY_IMAGE": "registry.example.com/team/mishards:1.2"}
    env.update({"STORAGE_CLASS": "nfs-client", "MYSQL_PASSWORD": "another-pw"})
    subprocess.run([str(DEMO / "start.sh"), "render", str(out)], env=env, check=True, timeout=60, capture_output=True)
    rendered = sorted(out.glob("*.yaml"))
    assert {path.name for path in rendered} == {path.name for path in MANIFESTS}
    result = subprocess.run(
        [tool, "--strict", "--quiet", *map(str, rendered)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    docs = [doc for path in rendered for doc in yaml.safe_load_all(path.read_text()) if doc]
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "vectors-prod"
        else:
            assert doc["metadata"]["namespace"] == "vectors-prod", doc["metadata"]["name"]
    images = [
        c["image"] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert "registry.example.com/team/mishards:1.2" in images


def test_the_proxy_accepts_its_configmap_and_secret(tmp_path: Path) -> None:
    environment = find("ConfigMap", "mishards-proxy-configmap")["data"]
    environment["SQLALCHEMY_DATABASE_URI"] = find("Secret", "mishards-mysql-secret")["stringData"][
        "SQLALCHEMY_DATABASE_URI"
    ]
    check = "from mishards.settings import load_settings; load_settings()"
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "MISHARDS_ENV_FILE": "none", **environment, "LOG_PATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
