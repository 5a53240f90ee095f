"""Tracing, chosen by `TRACER_CLASS_NAME`; empty means no tracing and no cost.

The proxy opens one server span per RPC (`rpc_span`), named after the gRPC method path, that
joins the caller's trace found in the call's metadata; inside it `span(name)` opens children of
the current span (kept in a context variable, so tasks started by `asyncio.gather` inherit it),
and `outgoing_metadata()` carries the current span to a backend call. The empty tracer returns
a shared no-op context manager and `None` metadata, and the proxy checks `enabled` once per
handler, so the search path pays nothing when tracing is off.

Built-in plugins are imported only when selected: `jaeger` (jaeger-client, the original's
choice) and `opentelemetry` (OTLP export). `TRACER_PLUGIN_PATH` adds directories of others.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from utils.plugins import PluginError, PluginFactory

_NO_SPAN = contextlib.nullcontext()
Metadata = Sequence[tuple[str, str]]

BUILTIN_PLUGINS = {"jaeger": "tracer.plugins.jaeger", "opentelemetry": "tracer.plugins.opentelemetry"}


class Tracer:
    """The no-op tracer; plugins subclass it."""

    name = "none"
    enabled = False

    def span(self, operation: str, parent: Any = None, **tags: Any) -> AbstractContextManager[Any]:
        """A child of `parent`, or of the current span when None; it is current inside the block."""
        return _NO_SPAN

    def rpc_span(self, method_path: str, metadata: Metadata | None, peer: str) -> AbstractContextManager[Any]:
        """The server span of one RPC, continuing the trace the caller sent in `metadata`."""
        return _NO_SPAN

    def rpc_finished(self, span: Any, status_code: int, reason: str, request: bytes, reply: bytes) -> None:
        """Tag the RPC's span with the reply's Milvus status (`error=True` when non-zero)."""

    def set_error(self, span: Any, message: str) -> None:
        """Mark a span failed, e.g. a backend call that failed over."""

    def outgoing_metadata(self) -> Metadata | None:
        """gRPC metadata carrying the current span to a backend node; None when not tracing."""
        return None

    def close(self) -> None:
        """Flush what is buffered; called once at shutdown."""


def create_tracer(class_name: str, plugin_path: str = "", config: dict[str, str] | None = None) -> Tracer:
    if not class_name:
        return Tracer()
    module = BUILTIN_PLUGINS.get(class_name.lower())
    builtins = [importlib.import_module(module).PLUGIN] if module else []
    factory = PluginFactory("tracer", builtins=builtins, search_path=plugin_path)
    if module is None and class_name.lower() not in factory.names:
        # built-ins are imported only when chosen, so list them by name
        available = sorted({*BUILTIN_PLUGINS, *factory.names})
        raise PluginError(f"tracer plugin {class_name} Not Installed! Available: {', '.join(available)}")
    return factory.create(class_name, config=config or {})
