"""Logging set-up: console plus a size-rotated file under LOG_PATH (the original never rotated)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys

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


def configure(
    level: str, log_path: str = "", log_name: str = "logfile", max_bytes: int = 100 * 1024 * 1024, backups: int = 5
) -> None:
    formatter = _RedactingFormatter(FORMAT)
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
    if problem:
        logging.getLogger(__name__).warning(problem)
