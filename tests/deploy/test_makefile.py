"""The Makefile's deployment targets, run for real against recording docker/compose/kubectl stubs."""

from __future__ import annotations

import re

import pytest

from tests.deploy.conftest import ROOT, Stubs

PROBE = ["docker", "run", "--rm", "--network", "host", "mishards:latest", "python", "all_in_one/probe_test.py"]
IMAGES = {"MISHARDS_IMAGE": "mishards:latest", "MILVUS_NODE_IMAGE": "mishards-node:latest"}


def make(stubs: Stubs, *args: str, **env: str) -> list[dict]:
    result = stubs.run(["make", "-s", "--no-print-directory", *args], **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return stubs.calls()


def test_build_builds_both_images_on_the_host_network(stubs: Stubs) -> None:
    make(stubs, "build")
    base = ["--build-arg", "BASE_IMAGE=python:3.11-slim-bookworm"]
    assert stubs.commands() == [
        ["docker", "build", "--network", "host", *base, "-t", "mishards:latest", "-f", "Dockerfile", "."],
        ["docker", "build", "--network", "host", *base, "-t", "mishards-node:latest", "-f", "Dockerfile.node", "."],
    ]


def test_build_and_push_take_registry_tag_and_base_image(stubs: Stubs) -> None:
    make(stubs, "build", "push", "REGISTRY=registry.example.com/team/", "TAG=1.2", "BASE_IMAGE=debian-py:3.11")
    base = ["--build-arg", "BASE_IMAGE=debian-py:3.11"]
    proxy, node = "registry.example.com/team/mishards:1.2", "registry.example.com/team/mishards-node:1.2"
    assert stubs.commands() == [
        ["docker", "build", "--network", "host", *base, "-t", proxy, "-f", "Dockerfile", "."],
        ["docker", "build", "--network", "host", *base, "-t", node, "-f", "Dockerfile.node", "."],
        ["docker", "push", proxy],
        ["docker", "push", node],
    ]


def test_deploy_recreates_the_sqlite_all_in_one(stubs: Stubs) -> None:
    calls = make(stubs, "deploy")
    assert stubs.commands() == [
        ["docker-compose", "-f", "all_in_one.yml", "down"],
        ["docker-compose", "-f", "all_in_one.yml", "up", "-d"],
    ]
    assert {call["cwd"] for call in calls} == {str(ROOT / "all_in_one")}
    assert calls[1]["env"] == IMAGES


def test_deploy_can_use_the_node_image_variant(stubs: Stubs) -> None:
    make(stubs, "deploy", "DEPLOY_FILE=all_in_one_node.yml", "IMAGE=m:1", "NODE_IMAGE=n:1")
    assert stubs.commands()[-1] == ["docker-compose", "-f", "all_in_one_node.yml", "up", "-d"]
    assert stubs.calls()[-1]["env"] == {"MISHARDS_IMAGE": "m:1", "MILVUS_NODE_IMAGE": "n:1"}


def test_clean_deploy_only_stops(stubs: Stubs) -> None:
    make(stubs, "clean_deploy")
    assert stubs.commands() == [["docker-compose", "-f", "all_in_one.yml", "down"]]


def test_mysql_variant_targets(stubs: Stubs) -> None:
    calls = make(stubs, "deploy_m")
    assert stubs.commands() == [
        ["docker-compose", "-f", "all_in_one_with_mysql.yml", "down"],
        ["docker-compose", "-f", "all_in_one_with_mysql.yml", "up", "-d"],
    ]
    assert {call["cwd"] for call in calls} == {str(ROOT / "all_in_one_with_mysql")}


@pytest.mark.parametrize(
    ("args", "host", "port"),
    [((), "127.0.0.1", "19530"), (("host=127.0.0.2", "port=19531"), "127.0.0.2", "19531")],
)
def test_probe_deploy_runs_the_probe_in_the_image(stubs: Stubs, args: tuple[str, ...], host: str, port: str) -> None:
    make(stubs, "probe_deploy", *args)
    assert stubs.commands() == [[*PROBE, "--host", host, "--port", port]]


def test_cluster_targets_use_start_sh(stubs: Stubs) -> None:
    make(stubs, "cluster")
    commands = stubs.commands()
    assert commands[0] == ["kubectl", "apply", "-f", "mishards_namespace.yaml"]
    assert commands[-1][:4] == ["kubectl", "rollout", "status", "deployment/mishards-proxy"]


def test_cluster_status_uses_the_manifests_namespace(stubs: Stubs) -> None:
    make(stubs, "cluster_status")
    assert stubs.commands()[0] == ["kubectl", "get", "pods", "-n", "mishards", "-o", "wide"]
    namespaces = {call["argv"][call["argv"].index("-n") + 1] for call in stubs.calls()}
    assert namespaces == {"mishards"}


def test_probe_cluster_probes_the_load_balancer_address(stubs: Stubs) -> None:
    make(stubs, "probe_cluster", STUB_LB_ADDRESS="127.0.0.1")
    assert stubs.commands()[-1] == [*PROBE, "--host", "127.0.0.1", "--port", "19530"]


def test_probe_cluster_fails_without_a_load_balancer_address(stubs: Stubs) -> None:
    result = stubs.run(["make", "-s", "--no-print-directory", "probe_cluster"])
    assert result.returncode != 0
    assert not [command for command in stubs.commands() if command[0] == "docker"]


def test_clean_cluster_deletes_every_manifest(stubs: Stubs) -> None:
    make(stubs, "clean_cluster")
    assert len(stubs.commands()) == 9
    assert stubs.commands()[-1] == ["kubectl", "delete", "-f", "mishards_namespace.yaml", "--ignore-not-found"]


def test_namespace_and_image_reach_start_sh(stubs: Stubs) -> None:
    make(stubs, "cluster_status", "NAMESPACE=vectors")
    assert stubs.commands()[0] == ["kubectl", "get", "pods", "-n", "vectors", "-o", "wide"]


def test_kubectl_variable_reaches_start_sh(stubs: Stubs) -> None:
    (stubs.bin / "kubectl").rename(stubs.bin / "kubectl-alt")
    make(stubs, "cluster_status", "KUBECTL=kubectl-alt")
    assert {call["tool"] for call in stubs.calls()} == {"kubectl-alt"}


def test_style_runs_ruff_check_and_format_check() -> None:
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^style:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe is not None
    assert recipe.group(1).split("\n")[:2] == ["\t$(PY) -m ruff check .", "\t$(PY) -m ruff format --check ."]


def test_the_existing_targets_are_kept_and_smoke_docker_is_not_in_test() -> None:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z_-]+):", text, re.M))
    assert {"venv", "test", "run", "proto", "coverage", "bench", "smoke-docker"} <= targets
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M)
    assert test_recipe is not None and "smoke" not in test_recipe.group(0)
