"""Whether the meta DB can be read, checked at start and then every health-check interval.

Every search reads the meta DB first, so a proxy that cannot read it answers every search with
an error; this check makes that visible: a WARNING at start and on every change of the reason,
an INFO line when it recovers, `/readyz` 503 with the reason meanwhile, and the same state on
the status page. One daemon thread does the checks; a check that hangs (a server that accepts
and then says nothing) is reported as such once it has taken longer than the timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from utils.logger import redact

log = logging.getLogger("mishards.meta")
_PROBE_SQL = sa.text("SELECT 1 FROM Tables WHERE 1 = 0")  # the table every search reads; no rows


def sqlite_path(engine: Engine) -> Path | None:
    """The file of a SQLite meta DB (None for other DBs and in-memory SQLite)."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def check_meta_db(engine: Engine) -> str:
    """'' when the meta DB answers a read of `Tables`; else why not, in one line without secrets."""
    path = sqlite_path(engine)
    if path is not None and not path.is_file():
        # connecting would create an empty file where the nodes' DB is meant to be: say so instead
        return f"the SQLite meta DB {path} does not exist (the nodes' meta.sqlite, SQLALCHEMY_DATABASE_URI)"
    try:
        with engine.connect() as connection:
            connection.execute(_PROBE_SQL)
    except Exception as exc:  # noqa: BLE001 - every driver error means the same thing here
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "no such table" in message.lower() or "doesn't exist" in message.lower():
            return f"the meta DB has no Milvus tables yet (start the writable node first): {message}"
        return redact(f"cannot read the meta DB ({engine.dialect.name}): {message}")[:400]
    return ""


class MetaMonitor:
    """Checks the meta DB every `interval` seconds on a daemon thread; `state()` is cheap."""

    def __init__(self, engine: Engine, interval: float, timeout: float) -> None:
        self.engine = engine
        self.interval = interval
        self.timeout = timeout
        self._reason: str | None = None  # None: not checked yet
        self._checking_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def check(self) -> str:
        """Check now (blocking), log a change, return the reason ('' when readable)."""
        with self._lock:
            self._checking_since = time.monotonic()
        reason = check_meta_db(self.engine)
        with self._lock:
            self._checking_since = None
            previous, self._reason = self._reason, reason
        if reason and reason != previous:
            log.warning("meta DB unreadable, searches fail until it is back: %s", reason)
        elif previous and not reason:
            log.info("meta DB readable again (%s)", self.engine.dialect.name)
        return reason

    def state(self) -> tuple[bool, str]:
        """(readable, reason); a check in flight for longer than the timeout counts as unreadable."""
        with self._lock:
            reason, since = self._reason, self._checking_since
        if since is not None and time.monotonic() - since > self.timeout:
            return False, f"the meta DB has not answered a check for {time.monotonic() - since:.1f} s"
        if reason is None:
            return True, "not checked yet"
        return not reason, reason or "ok"

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mishards-meta-check", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the checker must outlive any bug in one check
                log.exception("meta DB check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
