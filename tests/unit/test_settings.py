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


_MISHARDS_PREFIXES = {
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
    "HEALTH",
    "METRICS",
    "RPC",
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment (no Mishards variables, no .env read) plus the required ones."""
    for key in list(os.environ):
        if key.isupper() and key.split("_")[0] in _MISHARDS_PREFIXES:
            monkeypatch.delenv(key)
    for key in ("pool_size", "pool_recycle", "pool_timeout", "pool_pre_ping", "max_overflow"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(settings_module.ENV_FILE_VARIABLE, "none")
    monkeypatch.setattr(settings_module, "PACKAGE_DIR", tmp_path / "mishards")  # the .env lookup: none there
    monkeypatch.setattr(settings_module, "REPO_DIR", tmp_path)
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


@pytest.fixture
def dotenv_only(env, tmp_path):
    """Write a .env (which MISHARDS_ENV_FILE names) holding the required variables; the environment has none."""
    path = tmp_path / "only.env"

    def write(extra: str) -> None:
        for key in REQUIRED:
            env.delenv(key, raising=False)
        body = "".join(f"{k}={v}\n" for k, v in REQUIRED.items())
        path.write_text(body + extra)
        env.setenv(settings_module.ENV_FILE_VARIABLE, str(path))

    return write


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
    assert s.server_workers == 1, "one process unless SERVER_WORKERS says more"


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
        ("SERVER_WORKERS", "0"),
        ("SERVER_WORKERS", "two"),
        ("SERVER_WORKERS", "65"),
        ("SQLALCHEMY_DATABASE_URI", "nonsense"),
        ("SQLALCHEMY_DATABASE_URI", "postgresql://u:p@h/db"),
        ("SQLALCHEMY_DATABASE_URI", "nosuchdialect://h/db"),
        ("METRICS_PORT", "70000"),
        ("HEALTH_CHECK_TIMEOUT", "nan"),
        ("LOG_THIRD_PARTY_LEVEL", "chatty"),
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


def test_dotenv_lookup_environment_over_dotenv_over_example(env, tmp_path):
    env.delenv("WOSERVER")
    env.delenv(settings_module.ENV_FILE_VARIABLE)  # the default lookup: mishards/.env, then the repository's .env
    (tmp_path / ".env").write_text("WOSERVER=tcp://10.1.2.3:19531\nSERVER_PORT=19600\n")
    assert load_settings().woserver == "10.1.2.3:19531"
    (tmp_path / "mishards").mkdir()
    (tmp_path / "mishards" / ".env").write_text("WOSERVER=tcp://10.9.9.9:1\n")
    assert load_settings().woserver == "10.9.9.9:1", "mishards/.env comes first"
    env.setenv("SERVER_PORT", "19700")
    assert load_settings().server_port == 19700, "the environment wins over .env"
    (tmp_path / ".env.example").write_text("WOSERVER=tcp://example:1\nMAX_RETRY=7\nFROM_EXAMPLE=false\n")
    env.setenv("FROM_EXAMPLE", "true")
    s = load_settings()
    assert s.woserver == "10.9.9.9:1", ".env wins over .env.example"
    assert s.max_retry == 7, ".env.example fills what .env leaves out"
    assert s.sources == ("environment", str(tmp_path / "mishards" / ".env"), str(tmp_path / ".env.example"))


def test_from_example_may_be_set_in_dotenv(dotenv_only, tmp_path):
    (tmp_path / ".env.example").write_text("DISCOVERY_STATIC_HOSTS=from-example:5\n")
    dotenv_only("FROM_EXAMPLE=true\n")
    assert load_settings().discovery_config["DISCOVERY_STATIC_HOSTS"] == "from-example:5"


def test_env_file_variable_none_and_missing(env, tmp_path):
    (tmp_path / ".env").write_text("MAX_RETRY=9\n")
    assert load_settings().max_retry == 3, "MISHARDS_ENV_FILE=none reads no .env"
    env.setenv(settings_module.ENV_FILE_VARIABLE, str(tmp_path / "absent.env"))
    with pytest.raises(SettingsError, match=settings_module.ENV_FILE_VARIABLE):
        load_settings()


def test_discovery_group_from_dotenv_only(dotenv_only):
    dotenv_only(
        "DISCOVERY_CLASS_NAME=kubernetes\nDISCOVERY_STATIC_HOSTS=10.0.0.1:19541,10.0.0.2  # two nodes\n"
        "DISCOVERY_KUBERNETES_NAMESPACE=milvus\nDISCOVERY_KUBERNETES_POD_PATT=.*-ro-.*\n"
    )
    s = load_settings()
    assert s.discovery_class_name == "kubernetes"
    assert s.discovery_config["DISCOVERY_STATIC_HOSTS"] == "10.0.0.1:19541,10.0.0.2"
    assert s.discovery_config["DISCOVERY_KUBERNETES_NAMESPACE"] == "milvus"
    assert s.discovery_config["DISCOVERY_KUBERNETES_POD_PATT"] == ".*-ro-.*"


def test_discovery_from_dotenv_reaches_the_static_plugin(dotenv_only):
    """The case a new user met: DISCOVERY_STATIC_HOSTS in .env was reported empty."""
    from discovery.plugins.static import StaticDiscovery

    dotenv_only("DISCOVERY_STATIC_HOSTS=127.0.0.1:19541,127.0.0.1:19542\n")
    plugin = StaticDiscovery.create(config=load_settings().discovery_config, membership=None)
    assert [address for _, address in plugin.nodes] == ["127.0.0.1:19541", "127.0.0.1:19542"]


def test_tracing_group_from_dotenv_only(dotenv_only):
    dotenv_only(
        "TRACER_CLASS_NAME=jaeger\nTRACER_PLUGIN_PATH=/opt/tracers\nTRACING_SERVICE_NAME=from-dotenv\n"
        "TRACING_REPORTING_HOST=jaeger-agent\nTRACING_REPORTING_PORT=6831\nTRACING_SAMPLER_PARAM=0.5\n"
    )
    s = load_settings()
    assert (s.tracer_class_name, s.tracer_plugin_path) == ("jaeger", "/opt/tracers")
    assert s.tracing_config == {
        "TRACING_SERVICE_NAME": "from-dotenv",
        "TRACING_REPORTING_HOST": "jaeger-agent",
        "TRACING_REPORTING_PORT": "6831",
        "TRACING_SAMPLER_PARAM": "0.5",
    }


def test_db_group_from_dotenv_only(dotenv_only):
    dotenv_only(
        "SQLALCHEMY_DATABASE_URI=mysql+pymysql://milvus:pw@db:3306/milvus?charset=utf8mb4\n"
        "SQLALCHEMY_POOL_SIZE=12\nSQLALCHEMY_POOL_RECYCLE=60\nSQL_ECHO=true\nSCHEMA_CACHE_TTL=0.5\npool_pre_ping=false\n"
    )
    s = load_settings()
    assert s.sqlalchemy_database_uri.startswith("mysql+pymysql://milvus:pw@db:3306/")
    assert (s.pool_size, s.pool_recycle, s.sql_echo, s.schema_cache_ttl, s.pool_pre_ping) == (12, 60, True, 0.5, False)
    assert "pw" not in str(s.summary()), "the status page's summary hides the password"


def test_server_group_from_dotenv_only(dotenv_only):
    dotenv_only(
        "SERVER_HOST=127.0.0.1\nSERVER_PORT=19600\nWOSERVER=tcp://wo:19540\nMAX_RETRY=5\nTIMEOUT=7.5\n"
        "MAX_WORKERS=4\nRPC_TRANSPORT=grpcio\nMETRICS_PORT=19122\nLOG_LEVEL=warning\nDEBUG=false\n"
    )
    s = load_settings()
    assert (s.server_host, s.server_port, s.woserver) == ("127.0.0.1", 19600, "wo:19540")
    assert (s.max_retry, s.timeout, s.max_workers, s.rpc_transport) == (5, 7.5, 4, "grpcio")
    assert (s.metrics_port, s.log_level, s.debug) == (19122, "WARNING", False)


def test_health_group_from_dotenv_only(dotenv_only):
    dotenv_only(
        "HEALTH_CHECK_INTERVAL=0.5\nHEALTH_CHECK_TIMEOUT=0.25\n"
        "HEALTH_CHECK_FAILURES_TO_REMOVE=4\nHEALTH_CHECK_SUCCESSES_TO_RESTORE=3\n"
    )
    s = load_settings()
    assert (s.health_check_interval, s.health_check_timeout) == (0.5, 0.25)
    assert (s.health_check_failures_to_remove, s.health_check_successes_to_restore) == (4, 3)


def test_bad_value_in_dotenv_names_the_variable(dotenv_only):
    dotenv_only("HEALTH_CHECK_INTERVAL=soon\n")
    with pytest.raises(SettingsError, match="HEALTH_CHECK_INTERVAL"):
        load_settings()


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
        "SERVER_WORKERS",
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
