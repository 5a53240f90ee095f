"""Worker side of PymilvusClient: runs with the shim and an extracted pymilvus wheel on PYTHONPATH.

Protocol on stdin/stdout, one length-prefixed pickle per frame: first (host, port, kwargs) to
build `milvus.Milvus`, answered with ("ok", client version) or ("error", type, message); then
(method, args, kwargs) per call, answered the same way with the result made plain. End of stdin
ends the worker. Anything pymilvus prints goes to stderr so the reply stream stays clean.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import Any

from tests.support.pymilvus_client import SearchResult, Status, read_frame, write_frame


def plain(value: Any) -> Any:
    """A pymilvus result as plain picklable Python (see the PymilvusClient docstring)."""
    from milvus.client.abstract import TopKQueryResult
    from milvus.client.types import Status as MilvusStatus

    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, enum.Enum):
        return int(value) if isinstance(value, int) else value.name
    if isinstance(value, int):
        return int(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, MilvusStatus):
        code = value.code  # an int, or a grpc.StatusCode member for transport failures
        code = int(code) if isinstance(code, int) else getattr(code, "name", str(code))
        return Status(code=code, message=plain(value.message))
    if isinstance(value, TopKQueryResult):
        return SearchResult(
            ids=[list(map(int, row)) for row in value.id_array],
            distances=[list(map(float, row)) for row in value.distance_array],
            shape=(int(value.shape[0]), int(value.shape[1])),
        )
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return public_attributes(value)


def public_attributes(obj: Any) -> dict[str, Any]:
    """Instance attributes and properties not starting with "_" (CollectionSchema, IndexParam…)."""
    names = [name for name in getattr(obj, "__dict__", {}) if not name.startswith("_")]
    names += [
        name for name in dir(type(obj)) if not name.startswith("_") and isinstance(getattr(type(obj), name), property)
    ]
    return {name: plain(getattr(obj, name)) for name in names}


def main() -> None:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    host, port, client_kwargs = read_frame(requests)
    try:
        import milvus

        client = milvus.Milvus(host, port, **client_kwargs)
    except Exception as exc:  # reported to the parent, which raises RemoteClientError
        write_frame(replies, ("error", type(exc).__name__, str(exc)))
        return
    write_frame(replies, ("ok", milvus.__version__))
    try:
        while (request := read_frame(requests)) is not None:
            method, args, kwargs = request
            try:
                reply = ("ok", plain(getattr(client, method)(*args, **kwargs)))
            except Exception as exc:
                reply = ("error", type(exc).__name__, str(exc))
            write_frame(replies, reply)
    finally:
        client.close()


if __name__ == "__main__":
    main()
