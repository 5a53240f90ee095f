"""Tracing, chosen by `TRACER_CLASS_NAME`; empty means no tracing and no cost.

Code opens spans with `tracer.span(name, parent)`; the empty tracer returns a shared no-op
context manager, so the search path pays nothing when tracing is off.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from utils.plugins import PluginFactory

_NO_SPAN = contextlib.nullcontext()


class Tracer:
    """The no-op tracer; plugins subclass it."""

    name = "none"

    def span(self, operation: str, parent: Any = None, **tags: Any) -> ContextManager[Any]:
        return _NO_SPAN

    def server_interceptors(self) -> list:
        return []

    def close(self) -> None:
        pass


def create_tracer(class_name: str, plugin_path: str = "", config: dict[str, str] | None = None) -> Tracer:
    if not class_name:
        return Tracer()
    return PluginFactory("tracer", builtins=[], search_path=plugin_path).create(class_name, config=config or {})
