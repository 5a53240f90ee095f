"""Helpers for the deployment tests: required external tools, and stub tools that record calls.

The stubs stand in for `kubectl`, `docker` and `docker-compose` on PATH, so `start.sh` and the
Makefile's targets run their real shell logic without a cluster or an engine. Each call appends
one JSON line (tool, argv, cwd, selected environment) to a log, and a few queries get canned
answers that the test controls through STUB_* environment variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "scripts/install_docker_tools.sh compose installs it (.ci/run does)"

STUB = f"""#!{sys.executable}
import json, os, sys

tool = os.path.basename(sys.argv[0])
args = sys.argv[1:]
seen = {{k: os.environ[k] for k in ("MISHARDS_IMAGE", "MILVUS_NODE_IMAGE") if k in os.environ}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"tool": tool, "argv": args, "cwd": os.getcwd(), "env": seen}}) + "\\n")
if tool == "kubectl":
    joined = " ".join(args)
    if args[:1] == ["rollout"] and os.environ.get("STUB_ROLLOUT_FAIL", "\\0") in args:
        sys.exit(1)
    if "jsonpath={{.spec.replicas}}" in joined:
        print(os.environ.get("STUB_REPLICAS", "1"), end="")
    elif "jsonpath={{.status.loadBalancer" in joined:
        print(os.environ.get("STUB_LB_ADDRESS", ""), end="")
    elif "jsonpath={{.spec.ports[0].port}}" in joined:
        print("19530", end="")
"""


def require_tool(name: str, path: Path | str | None = None) -> str:
    """The tool's path; a missing tool skips the test, except under CI=true, where it fails."""
    found = str(path) if path is not None and Path(path).exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed; {INSTALL_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs {name}: {message}")
    pytest.skip(message)


@dataclass
class Stubs:
    """Stub tools in `bin`; `run` executes a command with them first on PATH."""

    bin: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, argv: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "STUB_LOG": str(self.log),
            **self.env,
            **env,
        }
        return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def commands(self) -> list[list[str]]:
        """Each call as [tool, *argv]; a manifest path as its file name (start.sh applies rendered copies)."""
        return [
            [call["tool"], *(Path(arg).name if arg.endswith(".yaml") else arg for arg in call["argv"])]
            for call in self.calls()
        ]


@pytest.fixture
def stubs(tmp_path: Path) -> Stubs:
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in ("kubectl", "docker", "docker-compose"):
        path = directory / tool
        path.write_text(STUB)
        path.chmod(0o755)
    return Stubs(bin=directory, log=tmp_path / "calls.jsonl")
