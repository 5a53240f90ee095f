"""Logging set-up: console plus a size-rotated file under LOG_PATH (the original never rotated).

Third-party protocol libraries log every frame and header at DEBUG (hpack alone wrote 159 of 172
lines after a few calls), so their loggers are pinned at LOG_THIRD_PARTY_LEVEL (WARNING by
default) whatever LOG_LEVEL is. `RateLimitedLog` keeps a repeating failure to one line per
interval per key, with the count of the ones it held back.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SECRET_IN_URL = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
# `password=...` in URL queries (pymysql takes one there) and key/value text such as `token: abc`
_SECRET_PARAM = re.compile(r"(?i)\b(password|passwd|pwd|secret|token)(\s*[=:]\s*['\"]?)[^&\s'\",;]+")


def redact(text: str) -> str:
    """Hide the passwords and tokens of a log line (DB URIs carry one)."""
    return _SECRET_PARAM.sub(r"\1\2***", _SECRET_IN_URL.sub(r"\1***@", text))


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Loggers of libraries that speak protocols for us; their DEBUG output is per frame or per request.
THIRD_PARTY_LOGGERS = ("hpack", "h2", "grpc", "urllib3", "kubernetes", "jaeger_tracing", "opentelemetry", "asyncio")


def configure(
    level: str,
    log_path: str = "",
    log_name: str = "logfile",
    third_party_level: str = "WARNING",
    max_bytes: int = 100 * 1024 * 1024,
    backups: int = 5,
    process: str = "",
) -> None:
    """`process` names one of several processes (SERVER_WORKERS: `supervisor`, `worker 1`): its lines
    say so, and it writes a file of its own (`logfile-worker-1.log`: a rotating file takes one writer)."""
    formatter = _RedactingFormatter(
        FORMAT.replace("%(levelname)s", f"[{process}] %(levelname)s") if process else FORMAT
    )
    if process.startswith("worker"):
        log_name = f"{log_name}-{process.replace(' ', '-')}"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    problem = ""
    if log_path:
        try:
            os.makedirs(log_path, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    os.path.join(log_path, f"{log_name}.log"), maxBytes=max_bytes, backupCount=backups
                )
            )
        except OSError as exc:
            problem = f"cannot write logs under LOG_PATH={log_path}: {exc}; logging to stderr only"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(third_party_level)
    if problem:
        logging.getLogger(__name__).warning(problem)


class RateLimitedLog:
    """At most one line per `interval` seconds per key; the next line says how many were held back.

    For failures that can repeat thousands of times a second (every search failing while the meta DB
    is down): the first is logged at once, the rest are counted."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}  # key -> (time logged, suppressed since)
        self._lock = threading.Lock()

    def allow(self, key: object) -> int | None:
        """None when this key was logged less than `interval` ago (the call is counted); else the count
        of calls held back since the last line, and the caller logs now."""
        now = time.monotonic()
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self.interval:
                self._last[key] = (entry[0], entry[1] + 1)
                return None
            if entry is None and len(self._last) >= self.max_keys:
                self._last.clear()  # bounded: forget every key rather than grow
            self._last[key] = (now, 0)
            return 0 if entry is None else entry[1]

    def log(self, level: int, key: object, message: str, *args: object) -> bool:
        held_back = self.allow(key)
        if held_back is None:
            return False
        if held_back:
            message += " (%d more like it in the last %.0f s not logged)"
            args = (*args, held_back, self.interval)
        self.logger.log(level, message, *args)
        return True
