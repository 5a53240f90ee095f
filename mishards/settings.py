"""Mishards' configuration: the original environment variable names and defaults, read once.

Every variable comes from one merged view (`Source`): the process environment, over a `.env`
file, over the repository's `.env.example` when `FROM_EXAMPLE` is true. The `.env` file is the
one `MISHARDS_ENV_FILE` names (`none`: no file), else the first of `mishards/.env` and the
repository's `.env`; paths are resolved from the package, not the current directory. Plugin
groups (`DISCOVERY_*`, `TRACING_*`) are read from the same view, so a `.env` configures them too.

Where the user's guide and the original code disagree, the guide's tables win (`DEBUG` defaults
to true there). A bad value raises `SettingsError`, one line naming the variable.

To add a setting: one field in `Settings` (in its group), one line in `_read`, a line in
`.env.example` and a row in README's table.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values

from mishards.protocol.http2 import DEFAULT_LIMITS, Limits

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
SUPPORTED_SERVER_VERSIONS = ("0.9", "0.10")  # by major.minor
ENV_FILE_VARIABLE = "MISHARDS_ENV_FILE"  # the .env file to read; `none` (or empty): none
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


class SettingsError(ValueError):
    """Configuration that cannot start the proxy; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """One field per variable, grouped as in `.env.example`."""

    # ---- server
    server_host: str
    server_port: int
    woserver: str  # host:port of the writable node (WOSERVER)
    max_retry: int
    timeout: float
    max_workers: int
    server_workers: int  # proxy processes sharing SERVER_PORT (SO_REUSEPORT); 1: this process alone
    rpc_transport: str  # http2: the proxy's own HTTP/2 (server and search calls); grpcio
    debug: bool
    timezone: str  # TIMEZONE: in the user's guide, so accepted and checked, but ignored (see README)
    # ---- meta DB
    sqlalchemy_database_uri: str
    sql_echo: bool
    pool_size: int
    pool_recycle: int
    pool_timeout: int
    pool_pre_ping: bool
    max_overflow: int
    schema_cache_ttl: float
    # ---- logging
    log_level: str
    log_path: str
    log_name: str
    log_third_party_level: str  # hpack, grpc, urllib3, kubernetes ... (LOG_THIRD_PARTY_LEVEL)
    # ---- plugins: routing, discovery (DISCOVERY_* passed whole), tracing (TRACING_* passed whole)
    router_plugin_path: str
    router_class_name: str
    discovery_plugin_path: str
    discovery_class_name: str
    discovery_config: dict[str, str] = field(default_factory=dict)
    tracer_plugin_path: str = ""
    tracer_class_name: str = ""
    tracing_config: dict[str, str] = field(default_factory=dict)
    # ---- health checks of every node (and of the meta DB, at the same interval)
    health_check_interval: float = 2.0  # seconds between health checks of every node
    health_check_timeout: float = 1.0  # seconds one check (`Cmd version`) may take
    health_check_failures_to_remove: int = 2  # failed checks in a row that take a node out of routing
    health_check_successes_to_restore: int = 2  # passed checks in a row that bring it back
    # ---- the proxy's own HTTP/2 server (H2_*, docs/front-door.md)
    front_door: Limits = DEFAULT_LIMITS
    # ---- tail tolerance: hedging, per-call timeouts, ejection, partial results
    hedge_enabled: bool = True  # race a slow node's search call on the next node of the ring
    hedge_delay_percentile: float = 95.0  # of a node's recent latencies: how long before hedging it
    hedge_min_delay: float = 0.05  # seconds; the hedge delay's floor ...
    hedge_max_delay: float = 0.5  # ... and cap (also the delay while a node has too few samples)
    hedge_budget_percent: float = 10.0  # hedges at most this share of node calls (token bucket)
    hedge_latency_window: float = 30.0  # seconds of latency samples the estimates use
    node_timeout_factor: float = 10.0  # one call's timeout: this times the node's p99 ...
    node_timeout_min: float = 5.0  # ... but at least this many seconds (bounded by the deadline)
    eject_after_slow_calls: int = 3  # timeouts or lost hedges in a row that eject a node from routing
    eject_max_percent: float = 50.0  # never eject more than this share of the read-only nodes
    partial_results: bool = False  # answer with the files that were searched when some cannot be
    # ---- side port: /metrics, status page, /healthz, /readyz
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # 0: no side port
    metrics_idle_timeout: float = 15.0  # seconds an idle (or slowly sending) HTTP connection is kept
    metrics_max_connections: int = 64  # open HTTP connections at once; more are closed at accept
    # ---- where the values came from (for the status page and the start-up log)
    sources: tuple[str, ...] = ()

    def summary(self) -> dict[str, object]:
        """The settings an operator checks first, without secrets (the DB URI's password is hidden)."""
        discovery = {k: v for k, v in sorted(self.discovery_config.items()) if k != "DISCOVERY_CLASS_NAME"}
        return {
            "server": f"{self.server_host}:{self.server_port}",
            "rpc_transport": self.rpc_transport,
            "server_workers": self.server_workers,
            "woserver": self.woserver,
            "meta_db": describe_database(self.sqlalchemy_database_uri),
            "discovery": self.discovery_class_name,
            "discovery_settings": discovery,
            "router": self.router_class_name,
            "tracer": self.tracer_class_name or "none",
            "timeout_s": self.timeout,
            "max_retry": self.max_retry,
            "health_check": {
                "interval_s": self.health_check_interval,
                "timeout_s": self.health_check_timeout,
                "failures_to_remove": self.health_check_failures_to_remove,
                "successes_to_restore": self.health_check_successes_to_restore,
            },
            "schema_cache_ttl_s": self.schema_cache_ttl,
            "log_level": self.log_level,
            "sources": list(self.sources),
        }


def describe_database(uri: str) -> str:
    """The meta DB's kind and server, never its password or file path (pages and logs are shared)."""
    try:
        from sqlalchemy.engine import make_url

        url = make_url(uri)
    except Exception:  # noqa: BLE001 - not a URL
        return "<not a URL>"
    if url.get_backend_name() == "sqlite":
        return "sqlite file"
    return f"{url.get_backend_name()} at {url.host or 'localhost'}:{url.port or 3306}"


def redact_url(uri: str) -> str:
    """A database URL with its password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: show nothing of it
        return "<not a URL>"


class Source:
    """The merged view of every variable; typed getters raise `SettingsError` naming the variable."""

    def __init__(self, values: Mapping[str, str], origins: tuple[str, ...] = ()) -> None:
        self.values = dict(values)
        self.origins = origins

    def raw(self, name: str) -> str | None:
        return self.values.get(name)

    def str(self, name: builtins.str, default: builtins.str = "") -> builtins.str:
        value = self.values.get(name)
        return default if value is None else value.strip()

    def required(self, name: builtins.str) -> builtins.str:
        value = self.str(name)
        if not value:
            raise SettingsError(f"{name} is required but not set")
        return value

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        text = self.str(name)
        if not text:
            return default
        try:
            value = int(text)
        except ValueError as exc:
            raise SettingsError(f"{name} must be an integer, got {text!r}") from exc
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be at most {maximum}, got {value}")
        return value

    def float(self, name: builtins.str, default: builtins.float, minimum: builtins.float) -> builtins.float:
        text = self.str(name)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError as exc:
            raise SettingsError(f"{name} must be a number, got {text!r}") from exc
        if not value >= minimum:  # also rejects NaN
            raise SettingsError(f"{name} must be at least {minimum:g}, got {text}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        text = self.str(name).lower()
        if not text:
            return default
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SettingsError(f"{name} must be true or false, got {self.str(name)!r}")

    def choice(self, name: builtins.str, default: builtins.str, allowed: tuple[builtins.str, ...]) -> builtins.str:
        value = self.str(name, default).lower() or default
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def group(self, prefix: builtins.str) -> dict[builtins.str, builtins.str]:
        """Every variable whose name starts with `prefix`, for a plugin group."""
        return {k: v.strip() for k, v in self.values.items() if k.startswith(prefix)}


def _dotenv_file(environ: Mapping[str, str]) -> Path | None:
    chosen = environ.get(ENV_FILE_VARIABLE)
    if chosen is not None:
        if chosen.strip().lower() in ("", "none"):
            return None
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise SettingsError(f"{ENV_FILE_VARIABLE} names {chosen!r}, which is not a file")
        return path
    for candidate in (PACKAGE_DIR / ".env", REPO_DIR / ".env"):
        if candidate.is_file():
            return candidate
    return None


def _read_dotenv(path: Path) -> dict[str, str]:
    try:
        values = dotenv_values(path, interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    return {k: v for k, v in values.items() if v is not None}


def load_source(environ: Mapping[str, str] | None = None) -> Source:
    """Process environment over `.env` over `.env.example` (only with FROM_EXAMPLE=true)."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, str]]] = []
    dotenv_path = _dotenv_file(environ)
    dotenv = _read_dotenv(dotenv_path) if dotenv_path is not None else {}
    if Source({**dotenv, **environ}).bool("FROM_EXAMPLE", False):
        example = REPO_DIR / ".env.example"
        if not example.is_file():
            raise SettingsError(f"FROM_EXAMPLE is true but {example} does not exist")
        layers.append((str(example), _read_dotenv(example)))
    if dotenv_path is not None:
        layers.append((str(dotenv_path), dotenv))
    merged: dict[str, str] = {}
    for _, values in layers:
        merged.update(values)
    merged.update(environ)
    origins = ("environment", *(name for name, _ in reversed(layers)))
    return Source(merged, origins)


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


def parse_database_uri(name: str, value: str) -> str:
    """A SQLAlchemy URL whose dialect is known; the error names the variable and hides the password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(value)
        url.get_dialect()
    except ArgumentError as exc:
        raise SettingsError(
            f"{name} is not a database URL (e.g. mysql+pymysql://user:password@host:3306/milvus "
            f"or sqlite:////var/lib/milvus/db/meta.sqlite), got {redact_url(value) if '@' in value else value!r}"
        ) from exc
    except NoSuchModuleError as exc:
        raise SettingsError(
            f"{name} names an unknown database dialect {url.drivername!r} (use mysql+pymysql or sqlite)"
        ) from exc
    if url.get_backend_name() not in ("sqlite", "mysql"):
        raise SettingsError(f"{name}: the Milvus meta DB is MySQL or SQLite, got {url.get_backend_name()!r}")
    return value


def load_settings(testing: bool = False, environ: Mapping[str, str] | None = None) -> Settings:
    """Read every setting; raise `SettingsError` with one line naming the variable."""
    return _read(load_source(environ), testing)


def _percent(source: Source, name: str, default: float) -> float:
    value = source.float(name, default, minimum=0.0)
    if value > 100:
        raise SettingsError(f"{name} must be at most 100, got {value:g}")
    return value


def _pool_int(source: Source, name: str, default: int) -> int:
    """The original read lower-case names (`pool_size`); its configmap wrote SQLALCHEMY_POOL_SIZE: accept both."""
    return source.int(f"SQLALCHEMY_{name.upper()}", source.int(name, default, minimum=0), minimum=0)


def _log_level(source: Source, name: str, default: str) -> str:
    level = source.str(name, default).upper() or default
    level = "WARNING" if level == "WARN" else level
    if level not in LOG_LEVELS:
        raise SettingsError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def _read(source: Source, testing: bool) -> Settings:
    s = source
    debug = s.bool("DEBUG", True)
    uri_name = "SQLALCHEMY_DATABASE_TEST_URI" if testing else "SQLALCHEMY_DATABASE_URI"
    return Settings(
        # server
        server_host=s.str("SERVER_HOST", "[::]") or "[::]",
        server_port=s.int("SERVER_PORT", 19530, minimum=0, maximum=65535),
        woserver=parse_woserver(s.required("WOSERVER")),
        max_retry=s.int("MAX_RETRY", 3, minimum=1),
        timeout=s.float("TIMEOUT", 60.0, minimum=0.1),
        max_workers=s.int("MAX_WORKERS", 50, minimum=1),
        server_workers=s.int("SERVER_WORKERS", 1, minimum=1, maximum=64),
        rpc_transport=s.choice("RPC_TRANSPORT", "http2", ("http2", "grpcio")),
        debug=debug,
        timezone=s.str("TIMEZONE", "UTC"),
        # meta DB
        sqlalchemy_database_uri=parse_database_uri(uri_name, s.required(uri_name)),
        sql_echo=s.bool("SQL_TEST_ECHO" if testing else "SQL_ECHO", False),
        pool_size=_pool_int(s, "pool_size", 100),
        pool_recycle=_pool_int(s, "pool_recycle", 3600),
        pool_timeout=_pool_int(s, "pool_timeout", 30),
        pool_pre_ping=s.bool("pool_pre_ping", True),
        max_overflow=_pool_int(s, "max_overflow", 0),
        schema_cache_ttl=s.float("SCHEMA_CACHE_TTL", 2.0, minimum=0.0),
        # logging
        log_level=_log_level(s, "LOG_LEVEL", "DEBUG" if debug else "INFO"),
        log_path=s.str("LOG_PATH", "/tmp/mishards"),
        log_name=s.str("LOG_NAME", "logfile") or "logfile",
        log_third_party_level=_log_level(s, "LOG_THIRD_PARTY_LEVEL", "WARNING"),
        # plugins
        router_plugin_path=s.str("ROUTER_PLUGIN_PATH"),
        router_class_name=s.str("ROUTER_CLASS_TEST_NAME" if testing else "ROUTER_CLASS_NAME", "FileBasedHashRingRouter")
        or "FileBasedHashRingRouter",
        discovery_plugin_path=s.str("DISCOVERY_PLUGIN_PATH"),
        discovery_class_name=s.str("DISCOVERY_CLASS_NAME", "static") or "static",
        discovery_config=s.group("DISCOVERY_"),
        tracer_plugin_path=s.str("TRACER_PLUGIN_PATH"),
        tracer_class_name=s.str("TRACER_CLASS_TEST_NAME" if testing else "TRACER_CLASS_NAME"),
        tracing_config=s.group("TRACING_"),
        # health checks
        health_check_interval=s.float("HEALTH_CHECK_INTERVAL", 2.0, minimum=0.05),
        health_check_timeout=s.float("HEALTH_CHECK_TIMEOUT", 1.0, minimum=0.05),
        health_check_failures_to_remove=s.int("HEALTH_CHECK_FAILURES_TO_REMOVE", 2, minimum=1),
        health_check_successes_to_restore=s.int("HEALTH_CHECK_SUCCESSES_TO_RESTORE", 2, minimum=1),
        # side port
        metrics_host=s.str("METRICS_HOST", "0.0.0.0") or "0.0.0.0",
        metrics_port=s.int("METRICS_PORT", 0, minimum=0, maximum=65535),
        metrics_idle_timeout=s.float("METRICS_IDLE_TIMEOUT", 15.0, minimum=0.1),
        metrics_max_connections=s.int("METRICS_MAX_CONNECTIONS", 64, minimum=1),
        # the proxy's own HTTP/2 server
        front_door=_front_door(s),
        # tail tolerance
        hedge_enabled=s.bool("HEDGE_ENABLED", True),
        hedge_delay_percentile=_percent(s, "HEDGE_DELAY_PERCENTILE", 95.0),
        hedge_min_delay=s.float("HEDGE_MIN_DELAY", 0.05, minimum=0.0),
        hedge_max_delay=s.float("HEDGE_MAX_DELAY", 0.5, minimum=0.0),
        hedge_budget_percent=_percent(s, "HEDGE_BUDGET_PERCENT", 10.0),
        hedge_latency_window=s.float("HEDGE_LATENCY_WINDOW", 30.0, minimum=1.0),
        node_timeout_factor=s.float("NODE_TIMEOUT_FACTOR", 10.0, minimum=1.0),
        node_timeout_min=s.float("NODE_TIMEOUT_MIN", 5.0, minimum=0.01),
        eject_after_slow_calls=s.int("EJECT_AFTER_SLOW_CALLS", 3, minimum=1),
        eject_max_percent=_percent(s, "EJECT_MAX_PERCENT", 50.0),
        partial_results=s.bool("PARTIAL_RESULTS", False),
        sources=source.origins,
    )


def _front_door(s: Source) -> Limits:
    """The H2_* limits of the proxy's own HTTP/2 server; defaults in `Limits` (docs/front-door.md)."""
    d = DEFAULT_LIMITS
    return Limits(
        max_concurrent_streams=s.int("H2_MAX_CONCURRENT_STREAMS", d.max_concurrent_streams, minimum=1),
        max_header_list_size=s.int("H2_MAX_HEADER_LIST_SIZE", d.max_header_list_size, minimum=1024),
        max_message_size=s.int("H2_MAX_MESSAGE_SIZE", d.max_message_size, minimum=1024),
        connection_buffer=s.int("H2_MAX_CONNECTION_BUFFER", d.connection_buffer, minimum=65_536),
        max_buffered=s.int("H2_MAX_BUFFERED_BYTES", d.max_buffered, minimum=65_536),
        max_connections=s.int("H2_MAX_CONNECTIONS", d.max_connections, minimum=1),
        handshake_timeout=s.float("H2_HANDSHAKE_TIMEOUT", d.handshake_timeout, minimum=0.1),
        idle_timeout=s.float("H2_IDLE_TIMEOUT", d.idle_timeout, minimum=0.1),
        read_timeout=s.float("H2_READ_TIMEOUT", d.read_timeout, minimum=0.1),
        abuse_window=s.float("H2_ABUSE_WINDOW", d.abuse_window, minimum=0.1),
        max_resets=s.int("H2_MAX_RESETS", d.max_resets, minimum=1),
        max_pings=s.int("H2_MAX_PINGS", d.max_pings, minimum=1),
        max_settings=s.int("H2_MAX_SETTINGS", d.max_settings, minimum=1),
        max_empty_frames=s.int("H2_MAX_EMPTY_FRAMES", d.max_empty_frames, minimum=1),
        max_control_frames=s.int("H2_MAX_CONTROL_FRAMES", d.max_control_frames, minimum=100),
        probation=s.float("H2_ABUSE_PROBATION", d.probation, minimum=0.0),
    )
