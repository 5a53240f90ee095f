"""Mishards' configuration: the original environment variable names and defaults, read once.

Values come from the environment, then from a `.env` file found upward from this package
(`mishards/.env` or the repository's `.env`), or with `FROM_EXAMPLE=true` from the repository's
`.env.example` (resolved from the package, not the current directory). Where the user's guide
and the original code disagree, the guide's tables win (`DEBUG` defaults to true there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from environs import Env, EnvError

from mishards.core.http2 import DEFAULT_LIMITS, Limits

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
SUPPORTED_SERVER_VERSIONS = ("0.9", "0.10")  # by major.minor


class SettingsError(ValueError):
    """Configuration that cannot start the proxy; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    debug: bool
    timezone: str
    max_retry: int
    timeout: float
    server_host: str
    server_port: int
    server_test_port: int
    max_workers: int
    woserver: str  # host:port of the writable node
    sqlalchemy_database_uri: str
    sql_echo: bool
    pool_size: int
    pool_recycle: int
    pool_timeout: int
    pool_pre_ping: bool
    max_overflow: int
    schema_cache_ttl: float
    log_level: str
    log_path: str
    log_name: str
    router_plugin_path: str
    router_class_name: str
    discovery_plugin_path: str
    discovery_class_name: str
    discovery_config: dict[str, str] = field(default_factory=dict)
    tracer_plugin_path: str = ""
    tracer_class_name: str = ""
    tracing_config: dict[str, str] = field(default_factory=dict)
    metrics_host: str = "0.0.0.0"  # the side port: /metrics, status page, /healthz, /readyz
    metrics_port: int = 0  # 0: no side port
    health_check_interval: float = 2.0  # seconds between health checks of every node
    health_check_timeout: float = 1.0  # seconds one check (`Cmd version`) may take
    health_check_failures_to_remove: int = 2  # failed checks in a row that take a node out of routing
    health_check_successes_to_restore: int = 2  # passed checks in a row that bring it back
    rpc_transport: str = "http2"  # http2: the proxy's own HTTP/2 (server and search calls); grpcio
    front_door: Limits = DEFAULT_LIMITS  # the HTTP/2 server's limits (H2_*, docs/front-door.md)


def _load_dotenv(env: Env) -> None:
    if env.bool("FROM_EXAMPLE", False):
        example = REPO_DIR / ".env.example"
        if not example.is_file():
            raise SettingsError(f"FROM_EXAMPLE is true but {example} does not exist")
        env.read_env(str(example), recurse=False, override=False)
        return
    for candidate in (PACKAGE_DIR / ".env", REPO_DIR / ".env"):
        if candidate.is_file():
            env.read_env(str(candidate), recurse=False, override=False)
            return


def parse_woserver(value: str) -> str:
    """`tcp://host:port` (or `host:port`) → `host:port`; IPv6 and names are fine, the port is required."""
    raw = value.strip()
    parsed = urlparse(raw if "://" in raw else f"tcp://{raw}")
    if parsed.scheme not in ("tcp", "grpc", "") or not parsed.hostname:
        raise SettingsError(f"WOSERVER must look like tcp://host:port, got {value!r}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if port is None:
        raise SettingsError(f"WOSERVER must name a port (tcp://host:port), got {value!r}")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{port}"


def load_settings(testing: bool = False) -> Settings:
    """Read every setting from the environment; raise `SettingsError` with one line naming the variable."""
    env = Env(expand_vars=False)
    try:
        _load_dotenv(env)
        return _read(env, testing)
    except EnvError as exc:
        raise SettingsError(str(exc)) from None


def _required(env: Env, name: str) -> str:
    value = env.str(name, "").strip()
    if not value:
        raise SettingsError(f"{name} is required but not set")
    return value


def _int(env: Env, name: str, default: int, minimum: int | None = None) -> int:
    try:
        value = env.int(name, default)
    except EnvError:
        raise SettingsError(f"{name} must be an integer, got {os.environ.get(name)!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Env, name: str, default: float, minimum: float) -> float:
    try:
        value = env.float(name, default)
    except EnvError:
        raise SettingsError(f"{name} must be a number, got {os.environ.get(name)!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Env, name: str, default: bool) -> bool:
    try:
        return env.bool(name, default)
    except EnvError:
        raise SettingsError(f"{name} must be true or false, got {os.environ.get(name)!r}") from None


def _choice(env: Env, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.str(name, default).strip().lower()
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _pool_int(env: Env, name: str, default: int) -> int:
    """The original read lower-case names (`pool_size`); its configmap wrote SQLALCHEMY_POOL_SIZE: accept both."""
    upper = f"SQLALCHEMY_{name.upper()}"
    return _int(env, upper, _int(env, name, default, minimum=0), minimum=0)


def _read(env: Env, testing: bool) -> Settings:
    debug = _bool(env, "DEBUG", True)
    uri_name = "SQLALCHEMY_DATABASE_TEST_URI" if testing else "SQLALCHEMY_DATABASE_URI"
    log_level = env.str("LOG_LEVEL", "DEBUG" if debug else "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
        raise SettingsError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {log_level!r}")
    prefixed = dict(os.environ)
    return Settings(
        debug=debug,
        timezone=env.str("TIMEZONE", "UTC"),
        max_retry=_int(env, "MAX_RETRY", 3, minimum=1),
        timeout=_float(env, "TIMEOUT", 60.0, minimum=0.1),
        server_host=env.str("SERVER_HOST", "[::]"),
        server_port=_int(env, "SERVER_PORT", 19530, minimum=0),
        server_test_port=_int(env, "SERVER_TEST_PORT", 19530, minimum=0),
        max_workers=_int(env, "MAX_WORKERS", 50, minimum=1),
        woserver=parse_woserver(_required(env, "WOSERVER")),
        sqlalchemy_database_uri=_required(env, uri_name),
        sql_echo=_bool(env, "SQL_TEST_ECHO" if testing else "SQL_ECHO", False),
        pool_size=_pool_int(env, "pool_size", 100),
        pool_recycle=_pool_int(env, "pool_recycle", 3600),
        pool_timeout=_pool_int(env, "pool_timeout", 30),
        pool_pre_ping=_bool(env, "pool_pre_ping", True),
        max_overflow=_pool_int(env, "max_overflow", 0),
        schema_cache_ttl=_float(env, "SCHEMA_CACHE_TTL", 2.0, minimum=0.0),
        log_level="WARNING" if log_level == "WARN" else log_level,
        log_path=env.str("LOG_PATH", "/tmp/mishards"),
        log_name=env.str("LOG_NAME", "logfile"),
        router_plugin_path=env.str("ROUTER_PLUGIN_PATH", ""),
        router_class_name=env.str(
            "ROUTER_CLASS_TEST_NAME" if testing else "ROUTER_CLASS_NAME", "FileBasedHashRingRouter"
        ),
        discovery_plugin_path=env.str("DISCOVERY_PLUGIN_PATH", ""),
        discovery_class_name=env.str("DISCOVERY_CLASS_NAME", "static"),
        discovery_config={k: v for k, v in prefixed.items() if k.startswith("DISCOVERY_")},
        tracer_plugin_path=env.str("TRACER_PLUGIN_PATH", ""),
        tracer_class_name=env.str("TRACER_CLASS_TEST_NAME" if testing else "TRACER_CLASS_NAME", ""),
        tracing_config={k: v for k, v in prefixed.items() if k.startswith("TRACING_")},
        metrics_host=env.str("METRICS_HOST", "0.0.0.0"),
        metrics_port=_int(env, "METRICS_PORT", 0, minimum=0),
        health_check_interval=_float(env, "HEALTH_CHECK_INTERVAL", 2.0, minimum=0.05),
        health_check_timeout=_float(env, "HEALTH_CHECK_TIMEOUT", 1.0, minimum=0.05),
        health_check_failures_to_remove=_int(env, "HEALTH_CHECK_FAILURES_TO_REMOVE", 2, minimum=1),
        health_check_successes_to_restore=_int(env, "HEALTH_CHECK_SUCCESSES_TO_RESTORE", 2, minimum=1),
        rpc_transport=_choice(env, "RPC_TRANSPORT", "http2", ("http2", "grpcio")),
        front_door=_front_door(env),
    )


def _front_door(env: Env) -> Limits:
    """The H2_* limits of the proxy's own HTTP/2 server; defaults in `Limits` (docs/front-door.md)."""
    d = DEFAULT_LIMITS
    return Limits(
        max_concurrent_streams=_int(env, "H2_MAX_CONCURRENT_STREAMS", d.max_concurrent_streams, minimum=1),
        max_header_list_size=_int(env, "H2_MAX_HEADER_LIST_SIZE", d.max_header_list_size, minimum=1024),
        max_message_size=_int(env, "H2_MAX_MESSAGE_SIZE", d.max_message_size, minimum=1024),
        connection_buffer=_int(env, "H2_MAX_CONNECTION_BUFFER", d.connection_buffer, minimum=65_536),
        max_buffered=_int(env, "H2_MAX_BUFFERED_BYTES", d.max_buffered, minimum=65_536),
        max_connections=_int(env, "H2_MAX_CONNECTIONS", d.max_connections, minimum=1),
        handshake_timeout=_float(env, "H2_HANDSHAKE_TIMEOUT", d.handshake_timeout, minimum=0.1),
        idle_timeout=_float(env, "H2_IDLE_TIMEOUT", d.idle_timeout, minimum=0.1),
        read_timeout=_float(env, "H2_READ_TIMEOUT", d.read_timeout, minimum=0.1),
        abuse_window=_float(env, "H2_ABUSE_WINDOW", d.abuse_window, minimum=0.1),
        max_resets=_int(env, "H2_MAX_RESETS", d.max_resets, minimum=1),
        max_pings=_int(env, "H2_MAX_PINGS", d.max_pings, minimum=1),
        max_settings=_int(env, "H2_MAX_SETTINGS", d.max_settings, minimum=1),
        max_empty_frames=_int(env, "H2_MAX_EMPTY_FRAMES", d.max_empty_frames, minimum=1),
    )
