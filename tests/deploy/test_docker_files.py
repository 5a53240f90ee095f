"""Static checks of the Dockerfiles, .dockerignore and the smoke script (the images themselves are
built and run by `make smoke-docker`, outside CI): the original's image had python:3.6, no EXPOSE,
no healthcheck and ran as root."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest

from tests.deploy.conftest import ROOT

DOCKERFILES = ["Dockerfile", "Dockerfile.node"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_slim_non_root_healthchecked_and_exposes_19530(name: str) -> None:
    steps = instructions(name)
    args = dict(step[1].split("=", 1) for step in steps if step[0] == "ARG" and "=" in step[1])
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert ("FROM", "${BASE_IMAGE}") in steps
    users = [value for kind, value in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "19530") in steps
    (healthcheck,) = [value for kind, value in steps if kind == "HEALTHCHECK"]
    assert "scripts/docker_healthcheck.py" in healthcheck
    copies = [value for kind, value in steps if kind == "COPY"]
    assert copies[0].startswith("requirements-base.txt "), "dependencies are installed before the source is copied"


def test_the_images_start_the_installed_console_scripts() -> None:
    assert ("CMD", '["mishards"]') in instructions("Dockerfile")
    assert ("CMD", '["milvus-node"]') in instructions("Dockerfile.node")
    for name in DOCKERFILES:
        assert any(kind == "RUN" and "pip install --no-cache-dir --no-deps ." in v for kind, v in instructions(name))


def _requirements(*files: str) -> set[str]:
    names = set()
    for name in files:
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r"):
                names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_each_image_installs_only_its_own_dependency_set() -> None:
    """The proxy image carries no faiss, the node image no kubernetes client (each was ~630 MB with both)."""
    proxy_copy = [v for kind, v in instructions("Dockerfile") if kind == "COPY"][0]
    node_copy = [v for kind, v in instructions("Dockerfile.node") if kind == "COPY"][0]
    assert proxy_copy == "requirements-base.txt requirements-proxy.txt ./"
    assert node_copy == "requirements-base.txt requirements-node.txt ./"
    proxy, node = (
        _requirements("requirements-base.txt", "requirements-proxy.txt"),
        _requirements("requirements-base.txt", "requirements-node.txt"),
    )
    assert "faiss-cpu" not in proxy and "kubernetes" not in node and "faiss-cpu" in node
    assert {"hpack", "uhashring", "prometheus-client", "python-dotenv"} <= proxy
    assert proxy | node == _requirements("requirements-base.txt", "requirements-proxy.txt", "requirements-node.txt")


def test_the_packages_import_only_what_their_dependency_set_installs() -> None:
    """No module of the proxy imports faiss, and none of the node imports kubernetes or prometheus."""
    for package, banned in (("mishards", ("faiss",)), ("milvus_node", ("kubernetes", "prometheus_client", "hpack"))):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for module in banned:
                assert not re.search(rf"^\s*(import|from) {module}\b", text, re.M), f"{path} imports {module}"


def test_dockerignore_keeps_secrets_and_state_out_but_the_probe_in() -> None:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.removeprefix("!").removeprefix("**/")
            if (
                fnmatch.fnmatch(path, pattern)
                or fnmatch.fnmatch(path.split("/")[-1], pattern)
                or fnmatch.fnmatch(path.split("/")[0], pattern)
            ):
                verdict = not negated
        return verdict

    for path in (".git", ".venv", ".run", ".env", "mishards/.env", "tests", "all_in_one/all_in_one.yml"):
        assert ignored(path), path
    for path in (
        "all_in_one/probe_test.py",
        "scripts/docker_healthcheck.py",
        "mishards/main.py",
        "milvus_node/__main__.py",
        "requirements.txt",
        ".env.example",
    ):
        assert not ignored(path), path


@pytest.mark.parametrize(
    "script", ["scripts/smoke_docker.sh", "scripts/install_docker_tools.sh", "kubernetes_demo/start.sh"]
)
def test_shell_scripts_parse(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, timeout=30).returncode == 0


def test_smoke_script_keeps_docker_off_every_network_but_the_host() -> None:
    text = (ROOT / "scripts" / "smoke_docker.sh").read_text()
    assert "--bridge=none --iptables=false --ip6tables=false" in text
    assert "all_in_one/all_in_one_node.yml" in text
    assert all(
        "--network host" in line or "--network none" in line
        for line in text.splitlines()
        if re.search(r"docker (run|build) ", line)
    )
    assert 'kill "$DOCKERD_PID"' in text and "pkill" not in text and "killall" not in text
