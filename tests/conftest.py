"""Shared fixtures: MySQL from `scripts/test.sh` (or skip), a fresh database per test, data dirs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MYSQL_URL_ENV = "MISHARDS_TEST_MYSQL_URL"
# A developer's mishards/.env (or .env) must not configure the proxies under test: settings read
# no .env file unless a test names one. Subprocesses inherit it (scripts/test.sh sets it too).
os.environ["MISHARDS_ENV_FILE"] = "none"


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The test MariaDB's URL (database `milvus`), set by scripts/test.sh; skip without it."""
    url = os.environ.get(MYSQL_URL_ENV)
    if not url:
        pytest.skip(f"{MYSQL_URL_ENV} is not set (run `make test`, which starts MariaDB)")
    return url


@contextmanager
def fresh_mysql_database(mysql_url: str) -> Iterator[str]:
    """The URL of a new, empty database `test_<random>`, dropped on exit."""
    import sqlalchemy as sa

    name = f"test_{uuid.uuid4().hex[:12]}"
    server = sa.create_engine(mysql_url, pool_pre_ping=True)
    try:
        with server.begin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        yield sa.make_url(mysql_url).set(database=name).render_as_string(hide_password=False)
        with server.begin() as conn:
            # Bounded: a leftover session of a killed node must not hang the teardown.
            conn.execute(sa.text("SET SESSION lock_wait_timeout = 30"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        server.dispose()


@pytest.fixture
def mysql_db_url(mysql_url: str) -> Iterator[str]:
    """A new, empty MySQL database for one test."""
    with fresh_mysql_database(mysql_url) as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def module_meta_uri(request, tmp_path_factory) -> Iterator[str]:
    """A meta DB shared by one test module, once on SQLite and once on a new MySQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('meta')}/meta.sqlite"
        return
    url = os.environ.get(MYSQL_URL_ENV)
    if not url:
        pytest.skip(f"{MYSQL_URL_ENV} is not set (run `make test`, which starts MariaDB)")
    with fresh_mysql_database(url) as database_url:
        yield database_url


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty data directory for one node or cluster (meta SQLite, segments, WAL)."""
    path = tmp_path / "data"
    path.mkdir()
    return path
