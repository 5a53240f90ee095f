"""`kubernetes` discovery: read-only nodes are the Ready pods under a label selector.

One loop, as kopf does it: list the pods, then watch from the list's resourceVersion, and
re-list on anything unexpected (410 Gone, a stream that ends or stalls, an API error) after a
bounded, doubling backoff. A pod is a node when it has an IP, its name fully matches
`DISCOVERY_KUBERNETES_POD_PATT` and its `Ready` condition is true (not merely phase Running,
original #4469); it leaves when it stops being Ready, is deleted or is missing from a re-list.
While the API server is unreachable the last known set stays as it is. The loop catches
everything, so discovery never freezes (#4618), and it logs each change once.

Settings (every `DISCOVERY_KUBERNETES_*`; the original's names and defaults):

| variable | default | meaning |
|---|---|---|
| `_NAMESPACE` | the in-cluster namespace file | namespace of the pods |
| `_IN_CLUSTER` | `False` | `true`: in-cluster service account config; else the kubeconfig |
| `_POLL_INTERVAL` | `5` | seconds; the cap of the re-list backoff and the client-side slack over `_WATCH_TIMEOUT` |
| `_POD_PATT` | empty: every pod | regex, full match against the pod name |
| `_LABEL_SELECTOR` | empty: every pod | e.g. `tier=ro-servers` |
| `_PORT` | `19530` | Milvus port on each pod |
| `_WATCH_TIMEOUT` | `60` | seconds the API server keeps one watch open; then the loop re-lists |
| `_PORT_ANNOTATION` | empty: off | a pod annotation whose value overrides `_PORT` for that pod |
| `_KUBECONFIG` | the client's default (`~/.kube/config`, `$KUBECONFIG`) | kubeconfig file |
| `_TOKEN_FILE`, `_CA_FILE`, `_NAMESPACE_FILE` | in `SERVICE_ACCOUNT_DIR` | in-cluster files (tests set them) |
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from .static import DiscoveryConfigError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
HTTP_GONE = 410
FIRST_BACKOFF_S = 0.2
CONNECT_TIMEOUT_S = 3.0
FIRST_SYNC_WAIT_S = 10.0
HEALTHY_WATCH_S = 1.0  # a watch that lasted this long ended normally, not in a loop


@dataclass(frozen=True)
class KubernetesConfig:
    namespace: str
    in_cluster: bool
    poll_interval: float
    pod_pattern: re.Pattern[str] | None
    label_selector: str
    port: int
    watch_timeout: int
    port_annotation: str
    kubeconfig: str
    token_file: str
    ca_file: str

    @classmethod
    def from_settings(cls, config: Mapping[str, str]) -> KubernetesConfig:
        def get(name: str, default: str = "") -> str:
            value = config.get(f"DISCOVERY_KUBERNETES_{name}")
            return default if value is None or not value.strip() else value.strip()

        def number(name: str, default: str, kind: type) -> Any:
            text = get(name, default)
            try:
                value = kind(text)
            except ValueError as exc:
                raise DiscoveryConfigError(f"DISCOVERY_KUBERNETES_{name} must be a number, got {text!r}") from exc
            if value <= 0:
                raise DiscoveryConfigError(f"DISCOVERY_KUBERNETES_{name} must be positive, got {text!r}")
            return value

        in_cluster_text = get("IN_CLUSTER", "false").lower()
        if in_cluster_text not in ("true", "false", "1", "0", "yes", "no"):
            raise DiscoveryConfigError(
                f"DISCOVERY_KUBERNETES_IN_CLUSTER must be true or false, got {in_cluster_text!r}"
            )
        pattern_text = get("POD_PATT")
        try:
            pattern = re.compile(pattern_text) if pattern_text else None
        except re.error as exc:
            raise DiscoveryConfigError(f"DISCOVERY_KUBERNETES_POD_PATT is not a valid regex: {exc}") from exc
        port = number("PORT", "19530", int)
        if port > 65535:
            raise DiscoveryConfigError(f"DISCOVERY_KUBERNETES_PORT must be a port number, got {port}")
        namespace = get("NAMESPACE") or _read_namespace_file(get("NAMESPACE_FILE", f"{SERVICE_ACCOUNT_DIR}/namespace"))
        return cls(
            namespace=namespace,
            in_cluster=in_cluster_text in ("true", "1", "yes"),
            poll_interval=number("POLL_INTERVAL", "5", float),
            pod_pattern=pattern,
            label_selector=get("LABEL_SELECTOR"),
            port=port,
            watch_timeout=number("WATCH_TIMEOUT", "60", int),
            port_annotation=get("PORT_ANNOTATION"),
            kubeconfig=get("KUBECONFIG"),
            token_file=get("TOKEN_FILE", f"{SERVICE_ACCOUNT_DIR}/token"),
            ca_file=get("CA_FILE", f"{SERVICE_ACCOUNT_DIR}/ca.crt"),
        )


def _read_namespace_file(path: str) -> str:
    """The original meant to fall back to this file but referenced an undefined name."""
    try:
        with open(path, encoding="utf-8") as handle:
            namespace = handle.read().strip()
    except OSError as exc:
        raise DiscoveryConfigError(
            f"DISCOVERY_KUBERNETES_NAMESPACE is not set and the in-cluster namespace file {path} "
            f"cannot be read: {exc.strerror}"
        ) from exc
    if not namespace:
        raise DiscoveryConfigError(f"DISCOVERY_KUBERNETES_NAMESPACE is not set and {path} is empty")
    return namespace


def _api_client(config: KubernetesConfig) -> k8s_client.ApiClient:
    """An API client of its own (the global default configuration is left alone)."""
    configuration = k8s_client.Configuration()
    try:
        if config.in_cluster:
            InClusterConfigLoader(token_filename=config.token_file, cert_filename=config.ca_file).load_and_set(
                configuration
            )
        else:
            k8s_config.load_kube_config(config_file=config.kubeconfig or None, client_configuration=configuration)
    except (k8s_config.ConfigException, OSError) as exc:
        mode = "in-cluster" if config.in_cluster else "kubeconfig"
        raise DiscoveryConfigError(
            f"DISCOVERY_KUBERNETES_IN_CLUSTER={config.in_cluster}: cannot load the {mode} configuration: {exc}"
        ) from exc
    return k8s_client.ApiClient(configuration)


class KubernetesDiscovery:
    """Keeps the membership equal to the Ready matching pods (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, config: KubernetesConfig, membership, api: k8s_client.CoreV1Api) -> None:
        self.config = config
        self.membership = membership
        self.api = api
        self.nodes: dict[str, str] = {}  # pod name -> address, as handed to the membership
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self._failing_since: str = ""  # the last API error logged, so an outage logs once

    @classmethod
    def create(cls, config: Mapping[str, str], membership) -> KubernetesDiscovery:
        settings = KubernetesConfig.from_settings(config)
        return cls(settings, membership, k8s_client.CoreV1Api(_api_client(settings)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop and wait (bounded) for the first list, so the proxy starts with its nodes."""
        self._thread = threading.Thread(target=self._run, name="discovery-kubernetes", daemon=True)
        self._thread.start()
        if not self._synced.wait(FIRST_SYNC_WAIT_S):
            log.warning(
                "no pod list from the Kubernetes API within %.0f s; serving without read-only nodes "
                "for now, discovery keeps trying",
                FIRST_SYNC_WAIT_S,
            )

    def stop(self) -> None:
        """End the loop (interrupting a watch that waits for data) and leave the membership."""
        self._stop.set()
        self._interrupt_watch()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT_S + 2)
            if self._thread.is_alive():
                log.warning("kubernetes discovery thread did not stop in time")
        for name in list(self.nodes):
            self.membership.remove(name)
        self.nodes.clear()
        self.api.api_client.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _interrupt_watch(self) -> None:
        """Shut the watch's socket down, which wakes the blocked read at once."""
        watch = self._watch
        if watch is None:
            return
        watch.stop()
        response = getattr(watch, "_resp", None)
        connection = getattr(response, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        backoff = FIRST_BACKOFF_S
        while not self._stop.is_set():
            started = time.monotonic()
            error = ""
            try:
                resource_version = self._relist()
                self._api_ok()
                self._watch_from(resource_version)  # returns when the server ends the stream
            except ApiException as exc:
                if exc.status == HTTP_GONE:
                    log.info("pod watch expired (410 Gone): re-listing")
                else:
                    error = f"API error {exc.status} {exc.reason}"
            except Exception as exc:  # a dropped or stalled stream, a refused connection, a surprise
                if self._stop.is_set():
                    return
                error = f"{type(exc).__name__}: {exc}"
            if not error and time.monotonic() - started >= HEALTHY_WATCH_S:
                backoff = FIRST_BACKOFF_S
                continue  # an ordinary end of a watch: re-list at once
            if error:
                self._api_failed(error)
            self._stop.wait(backoff)  # errors, and watches that end at once, slow down
            backoff = min(backoff * 2, self.config.poll_interval)

    def _api_failed(self, error: str) -> None:
        kind = error.split(":")[0]
        if kind != self._failing_since:
            log.warning(
                "kubernetes discovery: %s; keeping %d node(s), retrying with backoff up to %g s",
                error,
                len(self.nodes),
                self.config.poll_interval,
            )
            self._failing_since = kind
        else:
            log.debug("kubernetes discovery still failing: %s", error)

    def _api_ok(self) -> None:
        if self._failing_since:
            log.info("kubernetes API reachable again")
            self._failing_since = ""

    def _relist(self) -> str:
        """List the pods, reconcile the membership with them, return the list's resourceVersion."""
        pods = self.api.list_namespaced_pod(
            self.config.namespace,
            label_selector=self.config.label_selector or None,
            _request_timeout=(CONNECT_TIMEOUT_S, 2 * self.config.poll_interval + 1),
        )
        ready: dict[str, str] = {}
        for pod in pods.items:
            address = self._address_if_ready(pod)
            if address is not None and pod.metadata is not None and pod.metadata.name:
                ready[pod.metadata.name] = address
        for name in [n for n in self.nodes if n not in ready]:
            self._leave(name, "gone from the pod list or not Ready")
        for name, address in ready.items():
            self._join(name, address)
        self._synced.set()
        return (pods.metadata.resource_version if pods.metadata is not None else None) or ""

    def _watch_from(self, resource_version: str) -> None:
        """Apply watch events until the server ends the stream; raises on 410 and errors."""
        self._watch = k8s_watch.Watch()
        try:
            for event in self._watch.stream(
                self.api.list_namespaced_pod,
                self.config.namespace,
                label_selector=self.config.label_selector or None,
                resource_version=resource_version,
                timeout_seconds=self.config.watch_timeout,
                allow_watch_bookmarks=True,
                _request_timeout=(CONNECT_TIMEOUT_S, self.config.watch_timeout + self.config.poll_interval),
            ):
                if self._stop.is_set():
                    return
                self._apply(event["type"], event["object"])
        finally:
            self._watch = None

    def _apply(self, kind: str, pod: Any) -> None:
        """One watch event; a pod that cannot be read is skipped, never aborting the stream."""
        if kind == "BOOKMARK":
            return
        name = getattr(getattr(pod, "metadata", None), "name", None)
        if not name:
            return
        address = None if kind == "DELETED" else self._address_if_ready(pod)
        if address is None:
            if name in self.nodes:
                self._leave(name, "deleted" if kind == "DELETED" else "not Ready")
            return
        self._join(name, address)

    # ------------------------------------------------------------------ pods
    def _address_if_ready(self, pod: Any) -> str | None:
        """`ip:port` of a pod that should serve searches now, else None."""
        name = pod.metadata.name or ""
        if self.config.pod_pattern is not None and not self.config.pod_pattern.fullmatch(name):
            return None
        status = pod.status
        if status is None or not status.pod_ip or pod.metadata.deletion_timestamp is not None:
            return None
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        if not ready:
            return None
        port = self.config.port
        if self.config.port_annotation:
            annotated = (pod.metadata.annotations or {}).get(self.config.port_annotation, "")
            if annotated.isdigit() and 0 < int(annotated) < 65536:
                port = int(annotated)
        host = f"[{status.pod_ip}]" if ":" in status.pod_ip else status.pod_ip
        return f"{host}:{port}"

    def _join(self, name: str, address: str) -> None:
        """Recorded only once the membership took it, so a failure here is retried by the next list."""
        if self.nodes.get(name) == address:
            return
        self.membership.add(name, address)
        self.nodes[name] = address
        log.info("pod %s is Ready at %s", name, address)

    def _leave(self, name: str, why: str) -> None:
        log.info("pod %s left: %s", name, why)
        self.membership.remove(name)
        self.nodes.pop(name, None)
