"""The node's settings: start-up options (CLI or environment) and the runtime config of `Cmd`.

`get_config`/`set_config` address Milvus 0.9's `server_config.yaml` keys as `<parent>.<child>`.
Only the keys this node really acts on can be changed at run time; the rest read back as set at
start-up, and unknown keys are an error, so a client never believes a setting took effect when
it did not.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from utils.errors import IllegalArgument

ROLE_ALIASES = {
    "single": "single",
    "writable": "writable",
    "readonly": "readonly",
    "cluster_writable": "writable",
    "cluster_readonly": "readonly",
    "rw": "writable",
    "ro": "readonly",
}
DEPLOY_MODES = {"single": "single", "writable": "cluster_writable", "readonly": "cluster_readonly"}


@dataclass(frozen=True)
class NodeSettings:
    role: str
    host: str
    port: int
    data_dir: str
    meta_uri: str
    version: str
    auto_flush_interval: int
    cpu_cache_capacity_gb: int
    workers: int
    merge_after_s: float = 10.0


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> NodeSettings:
    """Options from the command line, falling back to MILVUS_NODE_* environment variables."""
    env = os.environ if environ is None else environ

    def default(name: str, fallback: str) -> str:
        return env.get(f"MILVUS_NODE_{name}", fallback)

    parser = argparse.ArgumentParser(prog="python -m milvus_node", description="A Milvus 0.9.1-compatible node.")
    parser.add_argument(
        "--role", default=default("ROLE", "single"), help="single | writable | readonly (env MILVUS_NODE_ROLE)"
    )
    parser.add_argument("--host", default=default("HOST", "127.0.0.1"), help="address to bind (env MILVUS_NODE_HOST)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(default("PORT", "19530")),
        help="gRPC port; 0 picks a free one (env MILVUS_NODE_PORT)",
    )
    parser.add_argument(
        "--data-dir",
        default=default("DATA_DIR", "/tmp/milvus"),
        help="storage root, Milvus' primary_path (env MILVUS_NODE_DATA_DIR)",
    )
    parser.add_argument(
        "--meta-uri",
        default=default("META_URI", ""),
        help="SQLAlchemy URL of the meta DB; default sqlite:///<data-dir>/db/meta.sqlite (env MILVUS_NODE_META_URI)",
    )
    parser.add_argument(
        "--version", default=default("VERSION", "0.9.1"), help="what Cmd version answers (env MILVUS_NODE_VERSION)"
    )
    parser.add_argument(
        "--auto-flush-interval",
        type=int,
        default=int(default("AUTO_FLUSH_INTERVAL", "1")),
        help="seconds between automatic flushes, 0 disables (env MILVUS_NODE_AUTO_FLUSH_INTERVAL)",
    )
    parser.add_argument(
        "--cpu-cache-capacity",
        type=int,
        default=int(default("CPU_CACHE_CAPACITY", "4")),
        help="GB of loaded segments to keep (env MILVUS_NODE_CPU_CACHE_CAPACITY)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(default("WORKERS", "16")),
        help="gRPC worker threads (env MILVUS_NODE_WORKERS)",
    )
    parser.add_argument(
        "--merge-after",
        type=float,
        default=float(default("MERGE_AFTER", "10")),
        help="seconds a small RAW file stays unchanged before the background merge takes it; "
        "negative disables merging (env MILVUS_NODE_MERGE_AFTER)",
    )
    args = parser.parse_args(argv)
    role = ROLE_ALIASES.get(args.role)
    if role is None:
        parser.error(f"--role must be one of single, writable, readonly (got {args.role!r})")
    data_dir = os.path.abspath(args.data_dir)
    meta_uri = args.meta_uri or f"sqlite:///{os.path.join(data_dir, 'db', 'meta.sqlite')}"
    return NodeSettings(
        role,
        args.host,
        args.port,
        data_dir,
        meta_uri,
        args.version,
        args.auto_flush_interval,
        args.cpu_cache_capacity,
        args.workers,
        args.merge_after,
    )


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _memory_gb(value: str) -> int:
    """A cache size in GB: positive and, as Milvus checks, not beyond the machine's memory."""
    number = _positive_int(value)
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    if number >= total_gb:
        raise ValueError(f"exceeds system memory ({total_gb:.0f} GB)")
    return number


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
        raise ValueError("must be true or false")
    return lowered in ("true", "on", "yes", "1")


class RuntimeConfig:
    """Key/value view of the server config that `Cmd get_config/set_config` use."""

    # key -> parser for the keys that may change at run time
    MUTABLE: dict[str, Callable[[str], object]] = {
        "db_config.auto_flush_interval": _non_negative_int,
        "cache_config.cpu_cache_capacity": _memory_gb,
        "cache_config.insert_buffer_size": _memory_gb,
        "cache_config.cache_insert_data": _bool,
        "engine_config.use_blas_threshold": _non_negative_int,
        "engine_config.gpu_search_threshold": _non_negative_int,
    }

    def __init__(self, settings: NodeSettings) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, str] = {
            "server_config.address": settings.host,
            "server_config.port": str(settings.port),
            "server_config.deploy_mode": DEPLOY_MODES[settings.role],
            "server_config.time_zone": "UTC+8",
            "server_config.web_enable": "false",
            "server_config.web_port": "19121",
            "db_config.backend_url": settings.meta_uri,
            "db_config.preload_collection": "",
            "db_config.auto_flush_interval": str(settings.auto_flush_interval),
            "storage_config.primary_path": settings.data_dir,
            "storage_config.secondary_path": "",
            "storage_config.file_cleanup_timeout": "10",
            "metric_config.enable_monitor": "false",
            "cache_config.cpu_cache_capacity": str(settings.cpu_cache_capacity_gb),
            "cache_config.insert_buffer_size": "1",
            "cache_config.cache_insert_data": "false",
            "engine_config.use_blas_threshold": "1100",
            "engine_config.gpu_search_threshold": "1000",
            "gpu_resource_config.enable": "false",
            "wal_config.enable": "true",
            "wal_config.recovery_error_ignore": "false",
            "wal_config.buffer_size": "256",
            "wal_config.wal_path": os.path.join(settings.data_dir, "wal"),
        }
        self._listeners: dict[str, Callable[[str], None]] = {}

    def on_change(self, key: str, listener: Callable[[str], None]) -> None:
        self._listeners[key] = listener

    def get(self, key: str) -> str:
        with self._lock:
            if key not in self._values:
                raise IllegalArgument(
                    f"Invalid config key: {key}. Use <parent>.<child>, e.g. cache_config.cpu_cache_capacity"
                )
            return self._values[key]

    def get_int(self, key: str) -> int:
        return int(self.get(key))

    def set(self, key: str, value: str) -> None:
        self.get(key)  # unknown keys fail the same way as in get_config
        parser = self.MUTABLE.get(key)
        if parser is None:
            raise IllegalArgument(f"Config {key} cannot be changed at run time")
        try:
            parser(value)
        except ValueError as exc:
            raise IllegalArgument(f"Invalid value {value!r} for config {key}: {exc}") from exc
        with self._lock:
            self._values[key] = value
        listener = self._listeners.get(key)
        if listener is not None:
            listener(value)
