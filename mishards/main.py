"""Start Mishards: `python mishards/main.py` or `python -m mishards`.

Reads the configuration, checks the writable node's version, starts discovery of the read-only
nodes and serves the Milvus API until SIGINT or SIGTERM, then shuts down in order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from discovery import discovery_factory  # noqa: E402
from discovery.plugins.static import DiscoveryConfigError  # noqa: E402
from mishards.meta import MetaReader, SchemaCache, create_engine  # noqa: E402
from mishards.nodes import HandshakeError, HealthPolicy, Membership, NodeClient  # noqa: E402
from mishards.observability.http import ObservabilityServer  # noqa: E402
from mishards.observability.metrics import Metrics  # noqa: E402
from mishards.observability.status import StatusSource  # noqa: E402
from mishards.router import router_factory  # noqa: E402
from mishards.service import MishardsService, start_server  # noqa: E402
from mishards.settings import Settings, SettingsError, load_settings  # noqa: E402
from mishards.transport import H2Server  # noqa: E402
from tracer import Tracer, create_tracer  # noqa: E402
from utils import logger  # noqa: E402
from utils.plugins import PluginError  # noqa: E402

log = logging.getLogger("mishards")


class Mishards:
    """The assembled proxy; `start` returns the bound port."""

    def __init__(self, settings: Settings, tracer: Tracer | None = None) -> None:
        """`tracer` replaces the one TRACER_CLASS_NAME names (for embedding and tests)."""
        self.settings = settings
        self.host = settings.server_host
        self.tracer = tracer or create_tracer(
            settings.tracer_class_name, settings.tracer_plugin_path, settings.tracing_config
        )
        self.metrics = Metrics() if settings.metrics_port else None
        engine = create_engine(
            settings.sqlalchemy_database_uri,
            echo=settings.sql_echo,
            pool_size=settings.pool_size,
            pool_recycle=settings.pool_recycle,
            pool_timeout=settings.pool_timeout,
            pool_pre_ping=settings.pool_pre_ping,
            max_overflow=settings.max_overflow,
        )
        self.meta = MetaReader(engine)
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
        self.router = router = router_factory(settings.router_plugin_path).create(settings.router_class_name)
        self.discovery = discovery_factory(settings.discovery_plugin_path).create(
            settings.discovery_class_name, config=settings.discovery_config, membership=self.membership
        )
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
        )
        self.server: grpc.aio.Server | H2Server | None = None
        self.serving = False
        self.http: ObservabilityServer | None = None

    def connect(self) -> None:
        """Check the writable node's version, then find the read-only nodes (blocking, before serving)."""
        try:
            self.service.backend_version = self.writable.handshake()
            log.info("writable node %s runs Milvus %s", self.writable.address, self.service.backend_version)
        except HandshakeError as exc:
            if "runs Milvus" in str(exc):
                raise  # an unsupported version is a configuration error, not an outage
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
        self.server, bound = await start_server(
            self.service,
            self.host,
            self.settings.server_port if port is None else port,
            self.settings.rpc_transport,
            self.settings.front_door,
        )
        self.serving = True
        log.info(
            "Mishards serving on %s:%d; writable %s; read-only %s",
            self.host,
            bound,
            self.settings.woserver,
            ", ".join(self.membership.names()) or "none yet",
        )
        if self.metrics is not None:
            self.start_http()
        await stopping.wait()
        log.info("stopping")
        self.serving = False
        await self.server.stop(grace=3)
        if self.http is not None:
            self.http.stop()
        self.discovery.stop()
        self.membership.stop()
        self.writable.close()
        self.tracer.close()

    def start_http(self) -> None:
        """The side port (METRICS_PORT): metrics, status page and probes."""
        self.metrics.watch(self.membership, self.writable)
        source = StatusSource(
            membership=self.membership,
            writable=self.writable,
            router=self.router,
            engine=self.meta.engine,
            conn_stats=self.service.conn_stats,
            serving=lambda: self.serving,
        )
        self.http = ObservabilityServer(self.settings.metrics_host, self.settings.metrics_port, self.metrics, source)
        self.http.start()
        log.info("metrics, status page and probes on http://%s:%d/", self.settings.metrics_host, self.http.port)


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"mishards: configuration error: {exc}", file=sys.stderr)
        return 2
    logger.configure(settings.log_level, settings.log_path, settings.log_name)
    try:
        app = Mishards(settings)
        app.connect()
    except (PluginError, DiscoveryConfigError, HandshakeError) as exc:
        print(f"mishards: cannot start: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await app.serve(stopping)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"mishards: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
