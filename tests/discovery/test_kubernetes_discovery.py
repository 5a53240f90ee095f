"""Kubernetes discovery end to end: the real kubernetes client in the proxy, a fake API server,
real read-only node processes as the pods, and searches checked against an oracle throughout.

After every change the proxy's membership (`Cmd conn_stats`) must equal the set of Ready pods
whose names fully match POD_PATT, within a bounded time, and no search may fail or be incomplete.
"""

from __future__ import annotations

import time

import pytest

from tests.support.processes import LOCALHOST

from ..proxy.conftest import MishardsProcess
from .conftest import NodeCluster, SearchStream, conn_stats, members, wait_for
from .fake_kube import PORT_ANNOTATION, FakeKubeAPI, self_signed_cert

CONVERGE_S = 15.0
COMMON_ENV = {
    "DISCOVERY_CLASS_NAME": "kubernetes",
    "DISCOVERY_STATIC_HOSTS": "",
    "DISCOVERY_KUBERNETES_POD_PATT": r"ro-\d+[a-z]?",
    "DISCOVERY_KUBERNETES_LABEL_SELECTOR": "app=mishards,tier=ro-servers",
    "DISCOVERY_KUBERNETES_PORT_ANNOTATION": PORT_ANNOTATION,
    "DISCOVERY_KUBERNETES_POLL_INTERVAL": "1",
    "DISCOVERY_KUBERNETES_WATCH_TIMEOUT": "3",
    "HEALTH_CHECK_INTERVAL": "0.5",
    "TIMEOUT": "10",
}


def converge(proxy: MishardsProcess, expected: set[str], what: str) -> None:
    def matches() -> bool:
        stats = conn_stats(proxy.address)
        return members(proxy.address) == expected and set(stats["readonly"]) == expected and not stats["waiting"]

    wait_for(
        f"{what}: membership == {sorted(expected)} (last: {sorted(conn_stats(proxy.address)['readonly'])})",
        matches,
        CONVERGE_S,
    )


def start_proxy(nodes: NodeCluster, env: dict[str, str]) -> MishardsProcess:
    return MishardsProcess(
        woserver=nodes.writable.address,
        meta_uri=nodes.meta_uri,
        ro_addresses=[],
        log_dir=nodes.log_dir,
        extra_env={**COMMON_ENV, **env},
    ).start()


def test_kubeconfig_over_http_follows_every_pod_change(nodes: NodeCluster, tmp_path):
    ports = [node.port for node in nodes.readonly]
    fake = FakeKubeAPI().start()
    proxy = None
    try:
        # a Running-but-not-Ready pod first (#4469), and foreign pods under the same label: one whose
        # name only starts like a read-only pod (full match, not prefix) and one that does not match
        fake.put_pod("ro-9", port=ports[2], ready=False)
        fake.put_pod("ro-2-canary", port=ports[2])
        fake.put_pod("other-0", port=ports[2])
        fake.put_pod("ro-0", port=ports[0])
        fake.put_pod("ro-1", port=ports[1])
        fake.put_pod("ro-7", port=ports[2], labels={"app": "elsewhere"})  # outside the selector
        fake.put_pod("ro-8", port=ports[2], ip=None)  # scheduled, no IP yet
        proxy = start_proxy(
            nodes,
            {
                "DISCOVERY_KUBERNETES_NAMESPACE": "mishards",
                "DISCOVERY_KUBERNETES_KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig")),
            },
        )
        converge(proxy, {"ro-0", "ro-1"}, "start")
        with SearchStream(proxy.address, nodes) as searches:
            fake.put_pod("ro-2", port=ports[2], ready=False)
            time.sleep(1.0)
            converge(proxy, {"ro-0", "ro-1"}, "pod added, not Ready yet")
            fake.put_pod("ro-2", port=ports[2])
            converge(proxy, {"ro-0", "ro-1", "ro-2"}, "pod became Ready")
            routed = conn_stats(proxy.address)["readonly"]["ro-2"]["files_routed"]
            wait_for(
                "the new pod receives files",
                lambda: conn_stats(proxy.address)["readonly"]["ro-2"]["files_routed"] > routed,
            )

            fake.put_pod("ro-1", port=ports[1], ready=False)
            converge(proxy, {"ro-0", "ro-2"}, "pod became not Ready")
            fake.put_pod("ro-1", port=ports[1])
            converge(proxy, {"ro-0", "ro-1", "ro-2"}, "pod Ready again")

            fake.delete_pod("ro-0")
            converge(proxy, {"ro-1", "ro-2"}, "pod deleted")

            # #15808: the pod is replaced under a new name (same node behind it)
            fake.delete_pod("ro-1")
            fake.put_pod("ro-1b", port=ports[1])
            converge(proxy, {"ro-1b", "ro-2"}, "pod renamed")

            # changes the watch never reports are found by the re-list that follows each fault
            fake.put_pod("ro-0", port=ports[0], notify=False)
            fake.expire_watches()
            converge(proxy, {"ro-0", "ro-1b", "ro-2"}, "after 410 Gone")

            fake.put_pod("ro-2", port=ports[2], ready=False, notify=False)
            fake.drop_streams()
            converge(proxy, {"ro-0", "ro-1b"}, "after a dropped stream")

            # the API server is down for a while: the last known set stays, then it converges
            failed_before = fake.failed_requests
            fake.fail(500)
            fake.drop_streams()
            fake.put_pod("ro-2", port=ports[2], notify=False)
            fake.delete_pod("ro-0", notify=False)
            deadline = time.monotonic() + 15  # the client may still be in its re-list backoff
            while fake.failed_requests == failed_before and time.monotonic() < deadline:
                time.sleep(0.1)
            assert fake.failed_requests > failed_before, "the client never met the outage"
            time.sleep(2.0)
            assert members(proxy.address) == {"ro-0", "ro-1b"}, "an outage must not empty the membership"
            fake.fail(None)
            converge(proxy, {"ro-1b", "ro-2"}, "API server back")

            # a stalled API server (no bytes at all) is detected by the client-side timeout
            fake.stall(True)
            fake.put_pod("ro-0", port=ports[0], notify=False)
            time.sleep(5.0)
            fake.stall(False)
            converge(proxy, {"ro-0", "ro-1b", "ro-2"}, "after a stall")

            # ordinary watch expiry (timeoutSeconds) and unrelated updates change nothing
            fake.put_pod("other-0", port=ports[2])
            time.sleep(4.0)
            converge(proxy, {"ro-0", "ro-1b", "ro-2"}, "steady state")
        searches.assert_all_complete(at_least=50)
        assert fake.watch_requests >= 6 and fake.list_requests >= 6
        assert proxy.alive()
    finally:
        if proxy is not None:
            proxy.stop()
        fake.stop()
    log = proxy.log_path.read_text() if proxy is not None else ""
    assert "Traceback" not in log
    # each change is logged once (by each worker process), and a long outage once, not once per retry
    once = proxy.workers if proxy is not None else 1
    assert log.count("pod ro-1b is Ready at") == once and log.count("pod ro-0 left: deleted") == once
    assert log.count("API error 500") == once


@pytest.fixture
def in_cluster_files(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("in-cluster-token")
    (account / "namespace").write_text("milvus-prod\n")
    return cert, key, account


def test_in_cluster_config_over_https(nodes: NodeCluster, in_cluster_files):
    cert, key, account = in_cluster_files
    ports = [node.port for node in nodes.readonly]
    fake = FakeKubeAPI(namespace="milvus-prod", token="in-cluster-token", tls=(cert, key)).start()
    proxy = None
    try:
        fake.put_pod("ro-0", port=ports[0])
        fake.put_pod("ro-1", port=ports[1], ready=False)
        fake.put_pod("other-1", port=ports[1])
        # no DISCOVERY_KUBERNETES_NAMESPACE: the in-cluster namespace file names it
        proxy = start_proxy(
            nodes,
            {
                "DISCOVERY_KUBERNETES_IN_CLUSTER": "True",
                "KUBERNETES_SERVICE_HOST": LOCALHOST,
                "KUBERNETES_SERVICE_PORT": str(fake.port),
                "DISCOVERY_KUBERNETES_TOKEN_FILE": str(account / "token"),
                "DISCOVERY_KUBERNETES_CA_FILE": str(cert),
                "DISCOVERY_KUBERNETES_NAMESPACE_FILE": str(account / "namespace"),
            },
        )
        converge(proxy, {"ro-0"}, "start")
        with SearchStream(proxy.address, nodes) as searches:
            fake.put_pod("ro-1", port=ports[1])
            fake.put_pod("ro-2", port=ports[2])
            converge(proxy, {"ro-0", "ro-1", "ro-2"}, "pods Ready")
            fake.put_pod("ro-0", port=ports[0], ready=False)
            converge(proxy, {"ro-1", "ro-2"}, "pod not Ready")
            fake.delete_pod("ro-2", notify=False)
            fake.expire_watches()
            converge(proxy, {"ro-1"}, "after 410 Gone")
            fake.put_pod("ro-0", port=ports[0], notify=False)
            fake.drop_streams()
            converge(proxy, {"ro-0", "ro-1"}, "after a dropped stream")
            fake.delete_pod("ro-1")
            converge(proxy, {"ro-0"}, "pod deleted")
        searches.assert_all_complete()
    finally:
        if proxy is not None:
            proxy.stop()
        fake.stop()
