"""Plugins by class name and search path, as the original's *_CLASS_NAME / *_PLUGIN_PATH worked."""

from __future__ import annotations

import pytest

from discovery import discovery_factory
from mishards.router import router_factory
from tracer import Tracer, create_tracer
from utils.plugins import PluginError, PluginFactory

PLUGIN = """
LOADS = globals().setdefault("LOADS", [])
LOADS.append(1)


class EveryFileToOneNode:
    name = "EveryFileToOneNode"

    @classmethod
    def create(cls, **kwargs):
        return cls()

    def assign(self, file_ids, nodes, excluded=()):
        return {sorted(set(nodes) - set(excluded))[0]: list(file_ids)}


def setup(factory):
    factory.register(EveryFileToOneNode)
"""


def test_builtin_names_are_case_insensitive():
    assert type(router_factory().create("filebasedhashringrouter")).__name__ == "FileBasedHashRingRouter"
    assert "static" in discovery_factory().names
    assert type(create_tracer("")) is Tracer


def test_plugin_path_modules_register_classes_once(tmp_path):
    (tmp_path / "one_node.py").write_text(PLUGIN)
    (tmp_path / "_private.py").write_text("raise RuntimeError('never imported')")
    router = router_factory(str(tmp_path)).create("everyfiletoonenode")
    assert router.assign(["1", "2"], ["b:1", "a:1"]) == {"a:1": ["1", "2"]}
    factory = router_factory(f"{tmp_path},{tmp_path / 'missing'}")  # a missing directory is only logged
    assert "everyfiletoonenode" in factory.names
    import sys

    module = sys.modules["_mishards_router_plugin_one_node"]
    assert module.LOADS == [1], "a plugin module is executed once, not re-executed"


def test_unknown_or_broken_plugins_fail_clearly(tmp_path):
    with pytest.raises(PluginError, match="Nope Not Installed"):
        router_factory().create("Nope")
    with pytest.raises(PluginError, match="no router plugin"):
        router_factory().create("")
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    with pytest.raises(PluginError, match="broken.py"):
        PluginFactory("tracer", search_path=str(tmp_path))
