"""Discovery of read-only nodes, chosen by `DISCOVERY_CLASS_NAME` (`static`; `kubernetes` later).

A provider is built with the `DISCOVERY_*` settings and the proxy's `Membership`, and keeps the
membership equal to the nodes it finds; the membership does the handshakes and health checks.
"""
from __future__ import annotations

from typing import Protocol

from utils.plugins import PluginFactory

from .plugins.static import StaticDiscovery


class DiscoveryProvider(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def discovery_factory(search_path: str = "") -> PluginFactory:
    return PluginFactory("discovery", builtins=[StaticDiscovery], search_path=search_path)
