"""Configuration: original names and defaults, the guide's defaults, one clear line per bad variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mishards import settings as settings_module
from mishards.settings import SettingsError, load_settings, parse_woserver

ROOT = settings_module.REPO_DIR
REQUIRED = {"WOSERVER": "tcp://127.0.0.1:19540", "SQLALCHEMY_DATABASE_URI": "sqlite:////tmp/x.sqlite"}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment (no Mishards variables, no .env found) plus the required ones."""
    for key in list(os.environ):
        if key.isupper() and key.split("_")[0] in {
            "WOSERVER",
            "SQLALCHEMY",
            "SQL",
            "DISCOVERY",
            "ROUTER",
            "TRACER",
            "TRACING",
            "LOG",
            "SERVER",
            "MAX",
            "TIMEOUT",
            "DEBUG",
            "FROM",
            "TIMEZONE",
            "SCHEMA",
        }:
            monkeypatch.delenv(key)
    for key in ("pool_size", "pool_recycle", "pool_timeout", "pool_pre_ping", "max_overflow"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(settings_module, "PACKAGE_DIR", tmp_path)  # no mishards/.env
    monkeypatch.setattr(settings_module, "REPO_DIR", tmp_path)
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_defaults_follow_the_guide(env):
    s = load_settings()
    assert s.debug is True and s.log_level == "DEBUG"  # the guide's table: Debug True, LOG_LEVEL DEBUG
    assert (s.server_port, s.max_retry, s.timezone) == (19530, 3, "UTC")
    assert s.woserver == "127.0.0.1:19540"
    assert (s.discovery_class_name, s.router_class_name, s.tracer_class_name) == (
        "static",
        "FileBasedHashRingRouter",
        "",
    )
    assert (s.log_path, s.log_name) == ("/tmp/mishards", "logfile")
    assert (s.pool_size, s.pool_recycle, s.pool_timeout, s.pool_pre_ping, s.max_overflow) == (100, 3600, 30, True, 0)
    assert s.max_workers == 50 and s.timeout == 60
    assert s.rpc_transport == "http2"


@pytest.mark.parametrize("name", ["WOSERVER", "SQLALCHEMY_DATABASE_URI"])
def test_required_variables(env, name):
    env.delenv(name)
    with pytest.raises(SettingsError, match=name):
        load_settings()


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAX_RETRY", "abc"),
        ("MAX_RETRY", "0"),
        ("SERVER_PORT", "x"),
        ("TIMEOUT", "-1"),
        ("DEBUG", "maybe"),
        ("LOG_LEVEL", "LOUD"),
        ("WOSERVER", "tcp://127.0.0.1"),
        ("WOSERVER", "http://h:1"),
        ("pool_size", "many"),
        ("RPC_TRANSPORT", "carrier-pigeon"),
    ],
)
def test_invalid_values_name_the_variable(env, name, value):
    env.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_original_lower_case_pool_names_and_configmap_names(env):
    env.setenv("pool_size", "7")
    env.setenv("pool_recycle", "50")
    assert (load_settings().pool_size, load_settings().pool_recycle) == (7, 50)
    env.setenv("SQLALCHEMY_POOL_SIZE", "9")
    assert load_settings().pool_size == 9


def test_testing_variables(env):
    env.setenv("SQLALCHEMY_DATABASE_TEST_URI", "sqlite:////tmp/test.sqlite")
    env.setenv("ROUTER_CLASS_TEST_NAME", "Other")
    s = load_settings(testing=True)
    assert s.sqlalchemy_database_uri == "sqlite:////tmp/test.sqlite" and s.router_class_name == "Other"


def test_discovery_and_tracing_settings_are_passed_through(env):
    env.setenv("DISCOVERY_STATIC_HOSTS", "a,b:1")
    env.setenv("TRACING_SERVICE_NAME", "svc")
    s = load_settings()
    assert s.discovery_config["DISCOVERY_STATIC_HOSTS"] == "a,b:1"
    assert s.tracing_config["TRACING_SERVICE_NAME"] == "svc"


def test_dotenv_and_from_example(env, tmp_path):
    env.delenv("WOSERVER")
    (tmp_path / ".env").write_text("WOSERVER=tcp://10.1.2.3:19531\nSERVER_PORT=19600\n")
    assert load_settings().woserver == "10.1.2.3:19531"
    env.setenv("SERVER_PORT", "19700")
    assert load_settings().server_port == 19700, "the environment wins over .env"
    (tmp_path / ".env.example").write_text("WOSERVER=tcp://example:1\n")
    env.setenv("FROM_EXAMPLE", "true")
    assert load_settings().woserver == "example:1"


def test_woserver_forms():
    assert parse_woserver("tcp://127.0.0.1:19530") == "127.0.0.1:19530"
    assert parse_woserver("milvus-wo:19530") == "milvus-wo:19530"
    assert parse_woserver("tcp://[::1]:19530") == "[::1]:19530"


def test_the_repository_example_is_complete_and_valid(env):
    env.setattr(settings_module, "REPO_DIR", ROOT)
    for key in REQUIRED:
        env.delenv(key)
    env.setenv("FROM_EXAMPLE", "true")
    s = load_settings()
    assert s.woserver and s.sqlalchemy_database_uri
    example = (ROOT / ".env.example").read_text()
    for name in (
        "WOSERVER",
        "SQLALCHEMY_DATABASE_URI",
        "MAX_RETRY",
        "TIMEOUT",
        "SERVER_PORT",
        "DISCOVERY_STATIC_HOSTS",
        "ROUTER_CLASS_NAME",
        "TRACER_CLASS_NAME",
        "LOG_LEVEL",
        "LOG_PATH",
        "LOG_NAME",
        "SQL_ECHO",
        "DISCOVERY_KUBERNETES_NAMESPACE",
        "TRACING_SAMPLER_TYPE",
        "FROM_EXAMPLE",
    ):
        assert name in example, name


def test_start_up_stops_with_one_line_naming_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WOSERVER", "SQLALCHEMY", "FROM_EXAMPLE"))}
    env["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/m.sqlite"
    result = subprocess.run(
        [sys.executable, "mishards/main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "WOSERVER" in lines[0], result.stderr


def test_tail_tolerance_settings_defaults_overrides_and_bad_values(env):
    from mishards.main import tail_policy

    s = load_settings()
    assert (s.hedge_enabled, s.hedge_budget_percent, s.hedge_max_delay, s.partial_results) == (True, 10.0, 0.5, False)
    policy = tail_policy(s)
    assert policy.hedging and policy.budget_ratio == 0.10 and policy.ejection_threshold == 3
    env.setenv("HEDGE_ENABLED", "false")
    env.setenv("HEDGE_BUDGET_PERCENT", "5")
    env.setenv("EJECT_AFTER_SLOW_CALLS", "5")
    env.setenv("PARTIAL_RESULTS", "true")
    policy = tail_policy(s := load_settings())
    assert not policy.hedging and policy.budget_ratio == 0.05 and policy.ejection_threshold == 5 and s.partial_results
    env.setenv("HEDGE_BUDGET_PERCENT", "150")
    with pytest.raises(SettingsError, match="HEDGE_BUDGET_PERCENT must be at most 100"):
        load_settings()
    env.setenv("HEDGE_BUDGET_PERCENT", "10")
    env.setenv("EJECT_AFTER_SLOW_CALLS", "0")
    with pytest.raises(SettingsError, match="EJECT_AFTER_SLOW_CALLS must be at least 1"):
        load_settings()
    example = (ROOT / ".env.example").read_text()
    for name in ("HEDGE_ENABLED", "HEDGE_BUDGET_PERCENT", "NODE_TIMEOUT_MIN", "EJECT_AFTER_SLOW_CALLS"):
        assert f"\n{name}=" in example, name
