"""The kubernetes plugin in-process (real client, fake API server): settings, a loop that
survives any exception, re-lists after faults, and a prompt, clean stop."""

from __future__ import annotations

import threading
import time

import pytest

from discovery import discovery_factory
from discovery.plugins.kubernetes import KubernetesConfig, KubernetesDiscovery
from discovery.plugins.static import DiscoveryConfigError

from .fake_kube import PORT_ANNOTATION, FakeKubeAPI


class RecordingMembership:
    """Stands in for `Membership`: records what the provider asks; `add` fails when told to."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.failures_left = 0
        self.lock = threading.Lock()

    def add(self, name: str, address: str) -> bool:
        with self.lock:
            if self.failures_left:
                self.failures_left -= 1
                raise RuntimeError("unexpected failure inside the membership")
            self.nodes[name] = address
        return True

    def remove(self, name: str) -> None:
        with self.lock:
            self.nodes.pop(name, None)


def eventually(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_settings_keep_the_original_names_and_defaults(tmp_path):
    config = KubernetesConfig.from_settings({"DISCOVERY_KUBERNETES_NAMESPACE": "xp"})
    assert (config.namespace, config.in_cluster, config.poll_interval, config.port, config.label_selector) == (
        "xp",
        False,
        5.0,
        19530,
        "",
    )
    assert config.pod_pattern is None and config.watch_timeout == 60 and config.port_annotation == ""
    assert config.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    pattern = KubernetesConfig.from_settings(
        {"DISCOVERY_KUBERNETES_NAMESPACE": "xp", "DISCOVERY_KUBERNETES_POD_PATT": ".*-ro-servers-.*"}
    ).pod_pattern
    assert pattern.fullmatch("mishards-ro-servers-0") and not pattern.fullmatch("mishards-wo-servers-0")
    # the namespace falls back to the in-cluster namespace file (the original's NameError, fixed)
    (tmp_path / "namespace").write_text("from-file\n")
    fallback = {"DISCOVERY_KUBERNETES_NAMESPACE_FILE": str(tmp_path / "namespace")}
    assert KubernetesConfig.from_settings(fallback).namespace == "from-file"
    assert KubernetesConfig.from_settings({**fallback, "DISCOVERY_KUBERNETES_IN_CLUSTER": "TRUE"}).in_cluster


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"DISCOVERY_KUBERNETES_NAMESPACE_FILE": "/nonexistent/namespace"}, "DISCOVERY_KUBERNETES_NAMESPACE"),
        ({"DISCOVERY_KUBERNETES_NAMESPACE": "x", "DISCOVERY_KUBERNETES_IN_CLUSTER": "maybe"}, "_IN_CLUSTER"),
        ({"DISCOVERY_KUBERNETES_NAMESPACE": "x", "DISCOVERY_KUBERNETES_POD_PATT": "ro-("}, "_POD_PATT"),
        ({"DISCOVERY_KUBERNETES_NAMESPACE": "x", "DISCOVERY_KUBERNETES_POLL_INTERVAL": "soon"}, "_POLL_INTERVAL"),
        ({"DISCOVERY_KUBERNETES_NAMESPACE": "x", "DISCOVERY_KUBERNETES_PORT": "70000"}, "_PORT"),
        ({"DISCOVERY_KUBERNETES_NAMESPACE": "x", "DISCOVERY_KUBERNETES_KUBECONFIG": "/nonexistent"}, "_IN_CLUSTER"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_variable(settings, named):
    with pytest.raises(DiscoveryConfigError, match=named):
        discovery_factory().create("kubernetes", config=settings, membership=RecordingMembership())


@pytest.fixture
def fake_and_discovery(tmp_path):
    fake = FakeKubeAPI().start()
    membership = RecordingMembership()
    discovery: KubernetesDiscovery = discovery_factory().create(
        "Kubernetes",
        membership=membership,
        config={
            "DISCOVERY_KUBERNETES_KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig")),
            "DISCOVERY_KUBERNETES_NAMESPACE": "mishards",
            "DISCOVERY_KUBERNETES_POD_PATT": r"ro-\d+",
            "DISCOVERY_KUBERNETES_LABEL_SELECTOR": "tier=ro-servers",
            "DISCOVERY_KUBERNETES_PORT_ANNOTATION": PORT_ANNOTATION,
            "DISCOVERY_KUBERNETES_POLL_INTERVAL": "0.5",
            "DISCOVERY_KUBERNETES_WATCH_TIMEOUT": "2",
        },
    )
    yield fake, membership, discovery
    discovery.stop()
    fake.stop()


def test_the_loop_survives_any_exception_and_converges(fake_and_discovery):
    fake, membership, discovery = fake_and_discovery
    fake.put_pod("ro-0", port=1000)
    membership.failures_left = 2  # the original's handler thread died on the first one (#4618)
    discovery.start()
    assert eventually(lambda: membership.nodes == {"ro-0": "127.0.0.1:1000"})
    fake.put_pod("ro-1", port=1001)
    assert eventually(lambda: set(membership.nodes) == {"ro-0", "ro-1"})
    assert discovery.alive()


def test_one_list_and_one_watch_per_cycle_not_n_plus_one_reads(fake_and_discovery):
    fake, membership, discovery = fake_and_discovery
    for i in range(5):
        fake.put_pod(f"ro-{i}", port=1000 + i)
    discovery.start()
    assert eventually(lambda: len(membership.nodes) == 5)
    time.sleep(0.5)
    assert fake.list_requests == 1 and fake.watch_requests == 1  # the original read every pod per poll (#26)


def test_stop_interrupts_an_open_watch_and_leaves_the_membership(fake_and_discovery):
    fake, membership, discovery = fake_and_discovery
    fake.put_pod("ro-0", port=1000)
    discovery.start()
    assert eventually(lambda: fake.watch_requests >= 1 and membership.nodes)
    started = time.monotonic()
    discovery.stop()
    assert time.monotonic() - started < 1.0 and not discovery.alive()
    assert membership.nodes == {}
    assert not [t for t in threading.enumerate() if t.name == "discovery-kubernetes"]
