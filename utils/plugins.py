"""Plugins chosen by class name from the environment, as the original Mishards did.

A factory knows its built-in plugin classes and may also scan a search path (`*_PLUGIN_PATH`,
one directory or several separated by `os.pathsep` or commas): every module there that defines
`setup(factory)` registers its classes with `factory.register(cls)`. Names match
case-insensitively (`static`, `kubernetes`, `Jaeger`, `FileBasedHashRingRouter`). Each module
is executed exactly once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A plugin could not be found or loaded; the message says which and why."""


class PluginFactory:
    def __init__(self, kind: str, builtins: Iterable[type] = (), search_path: str = "") -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}
        for cls in builtins:
            self.register(cls)
        for directory in _split_path(search_path):
            self._load_directory(directory)

    def register(self, cls: type) -> None:
        name = (getattr(cls, "name", None) or cls.__name__).lower()
        self._classes[name] = cls

    @property
    def names(self) -> list[str]:
        return sorted(self._classes)

    def plugin_class(self, class_name: str) -> type:
        if not class_name:
            raise PluginError(f"no {self.kind} plugin class name given")
        cls = self._classes.get(class_name.lower())
        if cls is None:
            raise PluginError(f"{self.kind} plugin {class_name} Not Installed! Available: {', '.join(self.names)}")
        return cls

    def create(self, class_name: str, **kwargs: Any) -> Any:
        cls = self.plugin_class(class_name)
        create: Callable[..., Any] = getattr(cls, "create", cls)
        return create(**kwargs)

    def _load_directory(self, directory: str) -> None:
        if not os.path.isdir(directory):
            log.warning("%s plugin path %s is not a directory; ignored", self.kind, directory)
            return
        for filename in sorted(os.listdir(directory)):
            if not filename.endswith(".py") or filename.startswith("_"):
                continue
            module_name = f"_mishards_{self.kind}_plugin_{filename[:-3]}"
            if module_name in sys.modules:
                module = sys.modules[module_name]
            else:
                spec = importlib.util.spec_from_file_location(module_name, os.path.join(directory, filename))
                if spec is None or spec.loader is None:
                    continue
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except Exception as exc:
                    del sys.modules[module_name]
                    raise PluginError(f"cannot load {self.kind} plugin {filename} from {directory}: {exc}") from exc
            setup = getattr(module, "setup", None)
            if callable(setup):
                setup(self)


def _split_path(search_path: str) -> list[str]:
    parts: list[str] = []
    for chunk in search_path.replace(",", os.pathsep).split(os.pathsep):
        if chunk.strip():
            parts.append(chunk.strip())
    return parts
