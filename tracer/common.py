"""What the tracer plugins share: reading `TRACING_*` settings, and describing payloads for span logs."""

from __future__ import annotations

import builtins

from google.protobuf import text_format

from utils.milvus_schema import REPLY_CLASSES, REQUEST_CLASSES
from utils.plugins import PluginError

PAYLOAD_TEXT_LIMIT = 2048
PAYLOAD_PARSE_LIMIT = 64 << 10  # larger payloads (bulk vectors) are described by size only: text costs ~0.7 s per MB


class TracingSettings:
    """`TRACING_*` values with the original defaults; a bad value names its variable."""

    def __init__(self, config: dict[str, str]) -> None:
        self._config = config

    def str(self, name: str, default: str) -> str:
        return self._config.get(name, "").strip() or default

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        raw = self._config.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise PluginError(f"{name} must be true or false, got {raw!r}")

    def int(self, name: builtins.str, default: builtins.int) -> builtins.int:
        raw = self._config.get(name, "").strip()
        try:
            return int(raw) if raw else default
        except ValueError as exc:
            raise PluginError(f"{name} must be an integer, got {raw!r}") from exc

    def float(self, name: builtins.str, default: builtins.float) -> builtins.float:
        raw = self._config.get(name, "").strip()
        try:
            return float(raw) if raw else default
        except ValueError as exc:
            raise PluginError(f"{name} must be a number, got {raw!r}") from exc


def describe_payload(method_path: str, data: bytes, request: bool) -> str:
    """A request or reply as protobuf text, cut to a size a span log can carry (TRACING_LOG_PAYLOAD)."""
    method = method_path.rsplit("/", 1)[-1]
    classes = REQUEST_CLASSES if request else REPLY_CLASSES
    if method not in classes or len(data) > PAYLOAD_PARSE_LIMIT:
        return f"<{len(data)} bytes>"
    message_type = classes[method]
    try:
        text = text_format.MessageToString(message_type.FromString(data), as_one_line=True)
    except Exception:  # noqa: BLE001 - a malformed payload is still worth a log entry
        return f"<{len(data)} bytes, not a valid {message_type.__name__}>"
    return text if len(text) <= PAYLOAD_TEXT_LIMIT else text[:PAYLOAD_TEXT_LIMIT] + "..."
