"""Routers, chosen by `ROUTER_CLASS_NAME` (`FileBasedHashRingRouter`), assign files to nodes."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from utils.plugins import PluginFactory

from .plugins.file_based_hash_ring_router import FileBasedHashRingRouter


class Router(Protocol):
    def assign(
        self, file_ids: Sequence[str], nodes: Collection[str], excluded: Collection[str] = ()
    ) -> dict[str, list[str]]: ...


def router_factory(search_path: str = "") -> PluginFactory:
    return PluginFactory("router", builtins=[FileBasedHashRingRouter], search_path=search_path)
