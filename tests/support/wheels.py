"""The reference pymilvus wheels (0.2.12 for Milvus 0.9.1, 0.2.14 for 0.10.1), extracted once.

`make venv` downloads them into .venv/wheels/<version>/; a test run without that step downloads
them itself. They are never installed into the venv: their old generated protobuf modules need
the slow pure-Python backend process-wide (docs/protocol.md), so they are only ever imported
in child processes, from an extracted copy under .cache/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = ROOT / ".venv" / "wheels"
CACHE_DIR = ROOT / ".cache" / "pymilvus"

# docs/protocol.md, "Old clients on a current protobuf": importable pymilvus on a current protobuf.
SHIM = """\
# sitecustomize.py - lets pymilvus 0.2.12 / 0.2.14 import on a current protobuf
import os, sys, types

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

_NAME = "google.protobuf.pyext._message"
if _NAME not in sys.modules:
    try:
        __import__(_NAME)
    except ImportError:
        from google.protobuf import descriptor_pb2
        stand_in = types.ModuleType(_NAME)
        # the container class of a repeated message field, whatever the backend
        stand_in.RepeatedCompositeContainer = type(descriptor_pb2.DescriptorProto().field)
        sys.modules[_NAME] = stand_in
"""


def wheel_path(version: str) -> Path:
    """The wheel file of pymilvus==version, downloaded (no dependencies) if missing."""
    directory = WHEEL_DIR / version
    path = directory / f"pymilvus-{version}-py3-none-any.whl"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(directory), f"pymilvus=={version}"],
            check=True,
            timeout=300,
        )
    return path


def extracted_wheel(version: str) -> Path:
    """A directory holding the wheel's `milvus` package; extracted atomically once per version."""
    target = CACHE_DIR / version / "site"
    if not (target / "milvus" / "__init__.py").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix="extract-"))
        with zipfile.ZipFile(wheel_path(version)) as wheel:
            wheel.extractall(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def shim_dir() -> Path:
    """A directory whose sitecustomize.py is the shim above (rewritten if it changed)."""
    directory = CACHE_DIR / "shim"
    path = directory / "sitecustomize.py"
    if not path.exists() or path.read_text() != SHIM:
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".sitecustomize.{id(path)}.tmp"
        staging.write_text(SHIM)
        staging.replace(path)
    return directory
