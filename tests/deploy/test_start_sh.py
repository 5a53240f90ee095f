"""kubernetes_demo/start.sh against a recording kubectl: the commands it issues, in order.

The original's `cluster_status` looked in the wrong namespace and `scale-worker` did nothing;
here every command names namespace `mishards`, and a scale that does not become ready is undone.
"""

from __future__ import annotations

import pytest

from tests.deploy.conftest import ROOT, Stubs

START = str(ROOT / "kubernetes_demo" / "start.sh")
NS = ["-n", "mishards"]
ROLLOUT = ["--timeout=300s"]


def kubectl(*args: str) -> list[str]:
    return ["kubectl", *args]


def test_cluster_applies_in_dependency_order_and_waits_for_each_tier(stubs: Stubs) -> None:
    result = stubs.run([START, "cluster"])
    assert result.returncode == 0, result.stderr
    assert stubs.commands() == [
        kubectl("apply", "-f", "mishards_namespace.yaml"),
        kubectl("apply", "-f", "mishards_data_pvc.yaml"),
        kubectl("apply", "-f", "mishards_secret.yaml"),
        kubectl("apply", "-f", "mishards_configmap.yaml"),
        kubectl("apply", "-f", "mishards_auxiliary.yaml"),
        kubectl("rollout", "status", "deployment/mishards-mysql", *NS, *ROLLOUT),
        kubectl("apply", "-f", "mishards_write_servers.yaml"),
        kubectl("rollout", "status", "deployment/mishards-wo-servers", *NS, *ROLLOUT),
        kubectl("apply", "-f", "mishards_stateful_servers.yaml"),
        kubectl("rollout", "status", "statefulset/mishards-ro-servers", *NS, *ROLLOUT),
        kubectl("apply", "-f", "mishards_rbac.yaml"),
        kubectl("apply", "-f", "mishards_proxy.yaml"),
        kubectl("rollout", "status", "deployment/mishards-proxy", *NS, *ROLLOUT),
    ]
    assert {call["cwd"] for call in stubs.calls()} == {str(ROOT / "kubernetes_demo")}


def test_cluster_stops_at_the_first_tier_that_does_not_become_ready(stubs: Stubs) -> None:
    result = stubs.run([START, "cluster"], STUB_ROLLOUT_FAIL="deployment/mishards-wo-servers")
    assert result.returncode != 0
    assert stubs.commands()[-1] == kubectl("rollout", "status", "deployment/mishards-wo-servers", *NS, *ROLLOUT)


def test_status_looks_in_the_demo_namespace(stubs: Stubs) -> None:
    assert stubs.run([START, "status"]).returncode == 0
    assert stubs.commands() == [
        kubectl("get", "pods", *NS, "-o", "wide"),
        kubectl("get", "services,pvc", *NS),
    ]


def test_scale_ro_server_scales_the_statefulset_and_waits(stubs: Stubs) -> None:
    result = stubs.run([START, "scale-ro-server", "3"], STUB_REPLICAS="1")
    assert result.returncode == 0, result.stderr
    assert stubs.commands() == [
        kubectl("get", "statefulset/mishards-ro-servers", *NS, "-o", "jsonpath={.spec.replicas}"),
        kubectl("scale", "statefulset/mishards-ro-servers", *NS, "--replicas=3"),
        kubectl("rollout", "status", "statefulset/mishards-ro-servers", *NS, *ROLLOUT),
    ]


def test_a_scale_that_does_not_become_ready_goes_back_to_the_previous_count(stubs: Stubs) -> None:
    result = stubs.run(
        [START, "scale-proxy", "4"],
        STUB_REPLICAS="2",
        STUB_ROLLOUT_FAIL="deployment/mishards-proxy",
        ROLLOUT_TIMEOUT="5s",
    )
    assert result.returncode == 1
    assert "back to 2" in result.stderr
    assert stubs.commands() == [
        kubectl("get", "deployment/mishards-proxy", *NS, "-o", "jsonpath={.spec.replicas}"),
        kubectl("scale", "deployment/mishards-proxy", *NS, "--replicas=4"),
        kubectl("rollout", "status", "deployment/mishards-proxy", *NS, "--timeout=5s"),
        kubectl("scale", "deployment/mishards-proxy", *NS, "--replicas=2"),
    ]


def test_scale_rejects_a_count_that_is_not_a_number(stubs: Stubs) -> None:
    result = stubs.run([START, "scale-ro-server", "two"])
    assert result.returncode == 2
    assert "non-negative integer" in result.stderr
    assert stubs.commands() == []


def test_scale_without_a_count_prints_usage(stubs: Stubs) -> None:
    result = stubs.run([START, "scale-proxy"])
    assert result.returncode == 2
    assert "scale-ro-server N" in result.stderr
    assert stubs.commands() == []


def test_delete_removes_everything_in_reverse_order(stubs: Stubs) -> None:
    assert stubs.run([START, "delete"]).returncode == 0
    files = [command[3] for command in stubs.commands()]
    assert files == [
        "mishards_proxy.yaml",
        "mishards_rbac.yaml",
        "mishards_stateful_servers.yaml",
        "mishards_write_servers.yaml",
        "mishards_auxiliary.yaml",
        "mishards_configmap.yaml",
        "mishards_secret.yaml",
        "mishards_data_pvc.yaml",
        "mishards_namespace.yaml",
    ]
    assert all(
        command[:3] == ["kubectl", "delete", "-f"] and command[4:] == ["--ignore-not-found"]
        for command in stubs.commands()
    )


def test_appdown_keeps_storage_config_and_mysql(stubs: Stubs) -> None:
    assert stubs.run([START, "appdown"]).returncode == 0
    assert [command[3] for command in stubs.commands()] == [
        "mishards_proxy.yaml",
        "mishards_rbac.yaml",
        "mishards_stateful_servers.yaml",
        "mishards_write_servers.yaml",
    ]


def test_address_prints_the_load_balancer_host_and_port(stubs: Stubs) -> None:
    result = stubs.run([START, "address"], STUB_LB_ADDRESS="127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "127.0.0.1 19530"
    assert all(
        command[1:3] == ["get", "service"] and command[3] == "mishards-proxy-servers" and NS[1] in command
        for command in stubs.commands()
    )


def test_address_fails_while_the_load_balancer_has_none(stubs: Stubs) -> None:
    result = stubs.run([START, "address"])
    assert result.returncode == 1
    assert "no LoadBalancer address" in result.stderr


def test_an_unknown_command_prints_usage(stubs: Stubs) -> None:
    result = stubs.run([START, "scale-worker", "2"])
    assert result.returncode == 2
    assert "start.sh cluster" in result.stderr
    assert stubs.commands() == []


def test_kubectl_is_configurable(stubs: Stubs) -> None:
    (stubs.bin / "kubectl").rename(stubs.bin / "kubectl-1.30")
    assert stubs.run([START, "status"], KUBECTL="kubectl-1.30").returncode == 0
    assert [call["tool"] for call in stubs.calls()] == ["kubectl-1.30", "kubectl-1.30"]


def test_cluster_applies_rendered_copies_and_removes_them(stubs: Stubs, tmp_path) -> None:
    result = stubs.run(
        [START, "cluster"], NAMESPACE="vectors", PROXY_IMAGE="reg.example/mishards:2", TMPDIR=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    applied = [call["argv"][2] for call in stubs.calls() if call["argv"][:2] == ["apply", "-f"]]
    assert all(path.startswith(str(tmp_path / "mishards-k8s.")) for path in applied), applied
    assert not list(tmp_path.glob("mishards-k8s.*")), "the rendered copies are removed on exit"
    waits = [call["argv"] for call in stubs.calls() if call["argv"][:1] == ["rollout"]]
    assert all(argv[argv.index("-n") + 1] == "vectors" for argv in waits)


def test_render_fills_in_namespace_image_password_and_storage_class(stubs: Stubs, tmp_path) -> None:
    out = tmp_path / "rendered"
    result = stubs.run(
        [START, "render", str(out)],
        NAMESPACE="vectors",
        PROXY_IMAGE="reg.example/team/mishards:2",
        PULL_POLICY="Always",
        MYSQL_PASSWORD="s3cret",
        STORAGE_CLASS="nfs-client",
    )
    assert result.returncode == 0, result.stderr
    assert stubs.commands() == []
    text = "\n".join(path.read_text() for path in sorted(out.glob("*.yaml")))
    assert "namespace: mishards" not in text and "namespace: vectors" in text
    assert "name: vectors" in (out / "mishards_namespace.yaml").read_text()
    assert "DISCOVERY_KUBERNETES_NAMESPACE: vectors" in text
    assert "image: reg.example/team/mishards:2" in text and "imagePullPolicy: Always  # proxy" in text
    assert "milvusroot" not in text and "s3cret" in (out / "mishards_secret.yaml").read_text()
    assert text.count("storageClassName: nfs-client") == 2


@pytest.mark.parametrize(
    "variable, value",
    [("NAMESPACE", "Not_A_Label"), ("PROXY_IMAGE", "a b"), ("MYSQL_PASSWORD", "p|w"), ("PULL_POLICY", "Sometimes")],
)
def test_render_rejects_bad_settings(stubs: Stubs, tmp_path, variable: str, value: str) -> None:
    result = stubs.run([START, "render", str(tmp_path / "out")], **{variable: value})
    assert result.returncode == 2 and variable in result.stderr


def test_usage_from_any_directory(stubs: Stubs, tmp_path) -> None:
    """From the repository root (or anywhere) it printed a sed error instead of its usage."""
    for cwd in (ROOT, tmp_path):
        result = stubs.run([START], cwd=cwd)
        assert result.returncode == 2
        assert "start.sh cluster" in result.stderr and "sed" not in result.stderr, result.stderr
