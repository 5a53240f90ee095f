"""Start Mishards: `mishards` (the installed console script), `python -m mishards`, or
`python mishards/main.py` in the environment it is installed in (`make venv` installs it).

Reads the configuration, takes its ports, checks the meta DB and the writable node (neither being
down stops start-up: both are logged and `/readyz` says why), starts discovery of the read-only
nodes and serves the Milvus API until SIGINT or SIGTERM, then shuts down in order. A
configuration error is one line on stderr naming the variable, and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

try:
    import grpc
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from discovery import discovery_factory
    from discovery.plugins.static import DiscoveryConfigError
    from mishards.core.compiled import COMPILED_KERNELS
    from mishards.core.hedging import TailPolicy, TailTolerance
    from mishards.meta import MetaReader, SchemaCache, create_engine
    from mishards.nodes import HandshakeError, HealthPolicy, Membership, NodeClient
    from mishards.observability.health import MetaMonitor
    from mishards.observability.http import ObservabilityServer, bind_socket
    from mishards.observability.metrics import Metrics, NoMetrics
    from mishards.observability.status import StatusSource
    from mishards.protocol.http2 import DEFAULT_LIMITS, Limits
    from mishards.protocol.server import H2Server
    from mishards.router import router_factory
    from mishards.service import MishardsService
    from mishards.settings import Settings, SettingsError, load_settings
    from mishards.workers import WorkerRole, supervise
    from tracer import Tracer, create_tracer
    from utils import logger
    from utils.milvus_schema import SERVICE
    from utils.plugins import PluginError
except ModuleNotFoundError as missing:  # run outside the environment it was installed in
    sys.exit(
        f"mishards: cannot import {missing.name!r}: install Mishards first (`make venv`, then `.venv/bin/mishards`; "
        "or `pip install -e '.[proxy]'` in a Python 3.11+ virtualenv)"
    )

log = logging.getLogger("mishards")


class Mishards:
    """The assembled proxy: build (configuration errors raise `SettingsError`), `bind`, `connect`, `serve`."""

    def __init__(self, settings: Settings, tracer: Tracer | None = None) -> None:
        """`tracer` replaces the one TRACER_CLASS_NAME names (for embedding and tests)."""
        self.settings = settings
        self.host = settings.server_host
        self.started_at = time.time()
        try:
            self.tracer = tracer or create_tracer(
                settings.tracer_class_name, settings.tracer_plugin_path, settings.tracing_config
            )
        except PluginError as exc:
            raise SettingsError(f"TRACER_CLASS_NAME={settings.tracer_class_name!r}: {exc}") from exc
        self.metrics = Metrics() if settings.metrics_port else NoMetrics()
        try:
            engine = create_engine(
                settings.sqlalchemy_database_uri,
                echo=settings.sql_echo,
                pool_size=settings.pool_size,
                pool_recycle=settings.pool_recycle,
                pool_timeout=settings.pool_timeout,
                pool_pre_ping=settings.pool_pre_ping,
                max_overflow=settings.max_overflow,
            )
        except (ArgumentError, NoSuchModuleError, ImportError, TypeError) as exc:
            raise SettingsError(f"SQLALCHEMY_DATABASE_URI cannot be used: {exc.__class__.__name__}: {exc}") from exc
        self.meta = MetaReader(engine)
        # A hung check counts as a failure after this long (a healthy DB answers in milliseconds).
        self.meta_monitor = MetaMonitor(engine, settings.health_check_interval, max(settings.health_check_timeout, 2.0))
        fast = settings.rpc_transport == "http2"
        self.writable = NodeClient("writable", settings.woserver, fast_transport=fast)
        self.membership = Membership(
            client_factory=functools.partial(NodeClient, fast_transport=fast),
            health=HealthPolicy(
                interval_s=settings.health_check_interval,
                timeout_s=settings.health_check_timeout,
                failures_to_remove=settings.health_check_failures_to_remove,
                successes_to_restore=settings.health_check_successes_to_restore,
            ),
            writable=self.writable,
        )
        try:
            self.router = router = router_factory(settings.router_plugin_path).create(settings.router_class_name)
        except PluginError as exc:
            raise SettingsError(f"ROUTER_CLASS_NAME={settings.router_class_name!r}: {exc}") from exc
        try:
            self.discovery = discovery_factory(settings.discovery_plugin_path).create(
                settings.discovery_class_name, config=settings.discovery_config, membership=self.membership
            )
        except PluginError as exc:
            raise SettingsError(f"DISCOVERY_CLASS_NAME={settings.discovery_class_name!r}: {exc}") from exc
        except DiscoveryConfigError as exc:
            raise SettingsError(str(exc)) from exc
        self.service = MishardsService(
            writable=self.writable,
            membership=self.membership,
            meta=self.meta,
            schemas=SchemaCache(self.meta, settings.schema_cache_ttl),
            router=router,
            tracer=self.tracer,
            timeout=settings.timeout,
            max_retry=settings.max_retry,
            metrics=self.metrics,
            tolerance=TailTolerance(tail_policy(settings)),
            partial_results=settings.partial_results,
        )
        self.server: grpc.aio.Server | H2Server | None = None
        self.serving = False
        self.http: ObservabilityServer | None = None
        self._metrics_socket: socket.socket | None = None
        self.on_serving: Callable[[], None] | None = None  # called once the API and side port serve

    def bind(self) -> None:
        """Take the ports now, before anything else starts, so a taken one is a configuration error
        naming its variable: METRICS_PORT is bound and kept; SERVER_PORT is tried and released (the
        server binds it again when it starts)."""
        self._bind_metrics()
        s = self.settings
        if s.server_port:
            try:
                _try_listen(s.server_host, s.server_port)
            except OSError as exc:
                raise SettingsError(
                    f"SERVER_PORT={s.server_port}: cannot listen on {s.server_host}:{s.server_port}: "
                    f"{exc.strerror or exc}"
                ) from exc

    def _bind_metrics(self) -> None:
        s = self.settings
        if s.metrics_port and self._metrics_socket is None:
            try:
                self._metrics_socket = bind_socket(s.metrics_host, s.metrics_port)
            except OSError as exc:
                raise SettingsError(
                    f"METRICS_PORT={s.metrics_port}: cannot listen on {s.metrics_host}:{s.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from exc

    def connect(self) -> None:
        """Check the writable node's version and the meta DB, then find the read-only nodes (blocking,
        before serving). Neither being down stops start-up: both are logged and shown by /readyz."""
        self.meta_monitor.check()
        self.meta_monitor.start()
        try:
            self.service.backend_version = self.writable.handshake()
            log.info("writable node %s runs Milvus %s", self.writable.address, self.service.backend_version)
        except HandshakeError as exc:
            if "runs Milvus" in str(exc):  # an unsupported version is a configuration error, not an outage
                raise SettingsError(f"WOSERVER={self.settings.woserver}: {exc}") from exc
            self.writable.set_health(False, str(exc))
            log.warning("writable node not reachable at start (searches still work): %s", exc)
        self.discovery.start()
        self.membership.start()
        if not self.service.backend_version:
            for client in self.membership.all().values():
                self.service.backend_version = client.stats.version
                break

    async def serve(self, stopping: asyncio.Event, port: int | None = None) -> None:
        """Serve until `stopping` is set, then shut down in order."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(self.settings.max_workers, thread_name_prefix="mishards-db"))
        port = self.settings.server_port if port is None else port
        self.membership.attach(loop)  # health checks from now on over each node's own connection
        try:
            self.server, bound = await start_server(
                self.service,
                self.host,
                port,
                self.settings.rpc_transport,
                self.settings.front_door,
                reuse_port=self.settings.server_workers > 1,  # sibling workers share the port
            )
        except OSError as exc:
            raise SettingsError(f"SERVER_PORT={port}: cannot listen on {self.host}:{port}: {exc}") from exc
        self.serving = True
        log.info(
            "Mishards serving on %s:%d; writable %s; read-only %s",
            self.host,
            bound,
            self.settings.woserver,
            ", ".join(self.membership.names()) or "none yet",
        )
        if self.metrics.enabled:
            await self.start_http()
        if self.on_serving is not None:
            self.on_serving()
        await stopping.wait()
        log.info("stopping")
        self.serving = False
        await self.server.stop(grace=3)
        if self.http is not None:
            await self.http.stop()
        self.meta_monitor.stop()
        await self.meta.close()  # the held MySQL session quits politely
        self.discovery.stop()
        await asyncio.to_thread(self.membership.stop)  # its probe thread may be waiting on this loop
        self.writable.close()
        self.tracer.close()

    async def start_http(self) -> None:
        """The side port (METRICS_PORT): metrics, status page and probes, on this event loop."""
        self._bind_metrics()
        self.metrics.watch(self.membership, self.writable)
        source = StatusSource(
            membership=self.membership,
            writable=self.writable,
            planner=self.service.planner,
            meta=self.meta,
            conn_stats=self.service.conn_stats,
            serving=lambda: self.serving,
            meta_monitor=self.meta_monitor,
            metrics=self.metrics,
            settings_summary=self.settings.summary(),
            started_at=self.started_at,
        )
        self.http = ObservabilityServer(
            self.metrics,
            source,
            idle_timeout=self.settings.metrics_idle_timeout,
            max_connections=self.settings.metrics_max_connections,
        )
        sock, self._metrics_socket = self._metrics_socket, None
        if sock is None:
            raise RuntimeError("the side port's socket was not bound before serving")
        await self.http.start(sock)
        if sock.family != socket.AF_UNIX:  # a worker's (SERVER_WORKERS): the supervisor serves the port
            log.info("metrics, status page and probes on http://%s:%d/", self.settings.metrics_host, self.http.port)


async def start_server(
    service: MishardsService,
    host: str,
    port: int,
    transport: str = "http2",
    limits: Limits = DEFAULT_LIMITS,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server | H2Server, int]:
    """Serve the API on host:port (port 0: any free one); the server and its port. Call inside the loop.
    `reuse_port`: sibling worker processes listen on the same port (SO_REUSEPORT, SERVER_WORKERS).

    `http2` (RPC_TRANSPORT, the default) is the proxy's own HTTP/2 server (protocol/server.py, about
    a third of grpc.aio's CPU per call, within `limits`: docs/front-door.md); `grpcio` is grpc.aio,
    kept as the reference the own server is tested against (README: RPC_TRANSPORT)."""
    if transport == "http2":
        server = H2Server(service.handlers(), limits)
        return server, await server.start(host, port, reuse_port)
    methods = {
        path.rpartition("/")[2]: grpc.unary_unary_rpc_method_handler(handler)
        for path, handler in service.handlers().items()
    }
    aio = grpc.aio.server(
        handlers=[grpc.method_handlers_generic_handler(SERVICE, methods)],
        options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    bound = aio.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await aio.start()
    return aio, bound


def tail_policy(settings: Settings) -> TailPolicy:
    """The hedging and ejection knobs, from the HEDGE_*, NODE_TIMEOUT_* and EJECT_* settings."""
    return TailPolicy(
        hedging=settings.hedge_enabled,
        delay_percentile=settings.hedge_delay_percentile,
        min_delay_s=settings.hedge_min_delay,
        max_delay_s=max(settings.hedge_max_delay, settings.hedge_min_delay),
        budget_ratio=settings.hedge_budget_percent / 100,
        window_s=settings.hedge_latency_window,
        timeout_factor=settings.node_timeout_factor,
        min_attempt_timeout_s=settings.node_timeout_min,
        ejection_threshold=settings.eject_after_slow_calls,
        max_ejected_share=settings.eject_max_percent / 100,
    )


def _try_listen(host: str, port: int) -> None:
    """Raise OSError when host:port cannot be listened on (taken, or not an address of this machine)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if host != "::":
            raise
        host, probe = "0.0.0.0", socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no IPv6 here
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.listen(1)


def _configure_logging(settings: Settings, process: str = "") -> None:
    """`process`: with SERVER_WORKERS, `supervisor` or `worker I` (each logs to a file of its own)."""
    logger.configure(
        settings.log_level, settings.log_path, settings.log_name, settings.log_third_party_level, process=process
    )


def main(argv: list[str] | None = None) -> int:
    """Start-up: every configuration error is one line on stderr naming the variable, exit code 2."""
    parser = argparse.ArgumentParser(
        prog="mishards",
        description="Mishards, a sharding proxy for Milvus 0.9/0.10. It is configured by environment variables, "
        "a .env file (mishards/.env, .env, or the file MISHARDS_ENV_FILE names) and, with FROM_EXAMPLE=true, "
        ".env.example; README.md lists them. Required: WOSERVER, SQLALCHEMY_DATABASE_URI.",
    )
    WorkerRole.add_arguments(parser)
    worker = WorkerRole.from_args(parser.parse_args(sys.argv[1:] if argv is None else argv))
    try:
        settings = load_settings()
        if worker is None and settings.server_workers > 1:  # a supervisor of worker processes
            return supervise(settings, functools.partial(_configure_logging, settings))
        app = Mishards(settings)
        if worker is None:
            app.bind()
        else:
            worker.bind(app)
    except SettingsError as exc:
        print(f"mishards: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings, worker.tag if worker else "")
    log.info("configuration read from %s", ", ".join(settings.sources))
    if not COMPILED_KERNELS:
        log.warning(
            "the compiled search kernels (mishards/core/_topk.c) are not installed: merging and reply "
            "decoding take the slower numpy paths (reinstall with a C compiler and Python's headers)"
        )
    try:
        app.connect()
    except (SettingsError, PluginError, DiscoveryConfigError, HandshakeError) as exc:
        print(f"mishards: configuration error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        if worker is not None:
            worker.attach(app, stopping)
        await app.serve(stopping)

    try:
        asyncio.run(run())
    except SettingsError as exc:
        print(f"mishards: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
