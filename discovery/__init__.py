"""Discovery of read-only nodes, chosen by `DISCOVERY_CLASS_NAME` (`static` or `kubernetes`).

A provider is built with the `DISCOVERY_*` settings and the proxy's `Membership`, and keeps the
membership equal to the nodes it finds; the membership does the handshakes and health checks.
"""

from __future__ import annotations

from typing import Any, Protocol

from utils.plugins import PluginFactory

from .plugins.static import StaticDiscovery


class DiscoveryProvider(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class KubernetesPlugin:
    """Registers `kubernetes` without importing the kubernetes client (0.5 s) unless it is chosen."""

    name = "kubernetes"

    @staticmethod
    def create(**kwargs: Any) -> DiscoveryProvider:
        from .plugins.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery.create(**kwargs)


def discovery_factory(search_path: str = "") -> PluginFactory:
    return PluginFactory("discovery", builtins=[StaticDiscovery, KubernetesPlugin], search_path=search_path)
