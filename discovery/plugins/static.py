"""`static` discovery: a fixed list of read-only nodes from `DISCOVERY_STATIC_HOSTS`.

Host names are kept, not resolved once at start as the original did: gRPC resolves them and
re-resolves them when a connection drops, and the membership's health checks renew a failing
node's probe channel, so a name that moves to another IP is followed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)


class DiscoveryConfigError(ValueError):
    """A DISCOVERY_* setting is missing or malformed; the message names it."""


def parse_hosts(hosts: str, default_port: int) -> list[tuple[str, str]]:
    """`a,b:19531` → [(name, address)]; the name is `host:port`, as the original's group names."""
    nodes = []
    for raw in hosts.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):  # [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = rest.lstrip(":") or str(default_port)
            address = f"[{host}]:{port}"
        elif entry.count(":") == 1:
            host, port = entry.split(":")
            address = f"{host}:{port}"
        else:
            address = f"{entry}:{default_port}"
            port = str(default_port)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DiscoveryConfigError(f"DISCOVERY_STATIC_HOSTS has a bad port in {entry!r}")
        nodes.append((address, address))
    return nodes


class StaticDiscovery:
    name = "static"

    def __init__(self, nodes: list[tuple[str, str]], membership) -> None:
        self.nodes = nodes
        self.membership = membership

    @classmethod
    def create(cls, config: Mapping[str, str], membership) -> StaticDiscovery:
        port_text = config.get("DISCOVERY_STATIC_PORT", "19530") or "19530"
        if not port_text.isdigit():
            raise DiscoveryConfigError(f"DISCOVERY_STATIC_PORT must be a port number, got {port_text!r}")
        nodes = parse_hosts(config.get("DISCOVERY_STATIC_HOSTS", ""), int(port_text))
        if not nodes:
            raise DiscoveryConfigError(
                "DISCOVERY_STATIC_HOSTS is empty: no address is specified for the read-only nodes"
            )
        return cls(nodes, membership)

    def start(self) -> None:
        """Add every node; one that fails its handshake is retried by the membership, not fatal."""
        for name, address in self.nodes:
            self.membership.add(name, address)

    def stop(self) -> None:
        for name, _ in self.nodes:
            self.membership.remove(name)
